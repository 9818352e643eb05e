#!/usr/bin/env bash
# Installs histoscope (editable), its test tools (the `dev` extra), Ray (the `ray` extra,
# whose executor the tests run on a loopback-only head), the viewer (`serve`, `serve-test`) and peft (`chat`) into the current
# Python (3.11 or newer). torch and torchvision are pinned in pyproject.toml (2.14.1 and
# 0.29.1): pip keeps them if the environment already has those versions, else installs them
# like every other dependency, from the package index pip is configured with.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --disable-pip-version-check -q -e ".[dev,ray,serve,serve-test,chat]"
# The viewer's browser test drives Debian's Chromium (no browser download at test time).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "install.sh: chromium is missing (apt-get install chromium as root); the viewer's browser test will be skipped" >&2
    fi
fi

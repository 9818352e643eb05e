#!/usr/bin/env bash
# Installs histoscope (editable), its test tools (the `dev` extra) and peft (the `chat` extra) into the current
# Python (3.11 or newer). torch and torchvision are pinned in pyproject.toml (2.14.1 and
# 0.29.1): pip keeps them if the environment already has those versions, else installs them
# like every other dependency, from the package index pip is configured with.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --disable-pip-version-check -q -e ".[dev,chat]"

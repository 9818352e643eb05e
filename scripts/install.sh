#!/usr/bin/env bash
# Installs histoscope and its test tools into the current Python (3.11).
# torch/torchvision are pinned in pyproject.toml to 2.14.1/0.29.1, which pip takes
# from this machine's local wheel store when present.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --disable-pip-version-check -q -e ".[dev]"

#!/usr/bin/env bash
# The whole test suite (no network, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -n 2 -q "$@"

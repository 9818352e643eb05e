#!/usr/bin/env bash
# One command from a fresh clone: install, then run the main job end to end on a
# sample slide the project generates (local executor, no network, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
histoscope demo --out "${1:-demo_out}"

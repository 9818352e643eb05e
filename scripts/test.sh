#!/usr/bin/env bash
# The whole test suite (no network, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -n 2 --dist loadgroup -q "$@"  # loadgroup: a module's xdist_group (one Ray head) stays on one worker

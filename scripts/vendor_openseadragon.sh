#!/usr/bin/env bash
# Refreshes the viewer's copy of OpenSeadragon from the npm registry (the built file and its
# licence, committed in src/histoscope/serve/static/ so a clean clone needs no npm). Usage:
#   scripts/vendor_openseadragon.sh [VERSION]      (default: the version committed)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-6.1.1}"
static=src/histoscope/serve/static
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "openseadragon@$version" >/dev/null && tar xzf "openseadragon-$version.tgz")
cp "$work/package/build/openseadragon/openseadragon.min.js" "$static/openseadragon.min.js"
cp "$work/package/LICENSE.txt" "$static/openseadragon.LICENSE.txt"
echo "vendored openseadragon $version into $static"

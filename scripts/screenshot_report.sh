#!/usr/bin/env bash
# Render an enginekit HTML report in headless Chromium and save a PNG, to check the plots show.
#   scripts/screenshot_report.sh artifacts/report.html [out.png]
# Needs Debian's chromium (apt-get install chromium); nothing is fetched from the network.
set -euo pipefail
html=$(realpath "$1")
png=${2:-${html%.html}.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --window-size=900,1500 \
  --screenshot="$png" "file://$html" 2>/dev/null
echo "wrote $png"

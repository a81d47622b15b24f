#!/usr/bin/env bash
# Browser check of the report page: a few synthetic Kvasir-shaped images are segmented by the
# shipped sam-tiny (Candle engine, no ONNX Runtime needed), then headless Chromium (Debian's
# `chromium` package) loads <out>/report.html from disk, takes a screenshot, and the DOM it
# ends up with must hold the summary, the Dice histogram and one table row per image.
#
#   scripts/browser-check.sh [WORKDIR]      # needs target/release/gps-seg and chromium
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
bin=./target/release/gps-seg
[ -x "$bin" ] || cargo build --release --locked
command -v chromium >/dev/null || { echo "browser-check: chromium not installed (apt-get install chromium)" >&2; exit 2; }
n=6
rm -rf "$work/data" "$work/out"
"$bin" data synth-kvasir --out "$work/data" --count $n --seed 3 --max-side 160 >/dev/null
"$bin" infer --engine candle --checkpoint sam/sam-tiny.safetensors --config sam/sam-tiny.json \
  --images "$work/data/images" --masks "$work/data/masks" --out "$work/out" --quiet >/dev/null
page="$work/out/report.html"
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --user-data-dir="$work/chrome-profile" --window-size=1200,1400)
chromium "${flags[@]}" --screenshot="$work/report.png" "file://$(realpath "$page")" 2>/dev/null
chromium "${flags[@]}" --dump-dom "file://$(realpath "$page")" 2>/dev/null >"$work/dom.html"
rows=$(python3 - "$work/dom.html" <<'PY'
import re, sys
dom = open(sys.argv[1]).read()
m = re.search(r'<table class="sortable" id="images">.*?<tbody>(.*?)</tbody>', dom, re.S)
print(len(re.findall(r'<tr>', m.group(1))) if m else -1)
PY
)
grep -q '<svg class="chart"' "$work/dom.html" || { echo "browser-check: no histogram in the DOM" >&2; exit 1; }
grep -q '>mDice<' "$work/dom.html" || { echo "browser-check: no mDice in the summary" >&2; exit 1; }
[ -s "$work/report.png" ] || { echo "browser-check: no screenshot" >&2; exit 1; }
if [ "$rows" != "$n" ]; then
  echo "browser-check: the table has $rows rows, expected one per image ($n)" >&2; exit 1
fi
echo "browser-check: ok ($rows rows, histogram, summary; screenshot $work/report.png)"

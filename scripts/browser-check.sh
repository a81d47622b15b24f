#!/usr/bin/env bash
# Browser check of the report pages: a few synthetic Kvasir-shaped images are segmented by the
# shipped sam-tiny (Candle engine, no ONNX Runtime needed), then headless Chromium (Debian's
# `chromium` package) loads <out>/report.html from disk, takes a screenshot, and the DOM it
# ends up with must hold the summary, the Dice histogram and one table row per image; then a
# two-epoch training run's report.html must show its curves and one row per epoch, and a PraNet
# run's its headline with the five test sets and the selection map; last,
# `gps-seg serve` runs the shipped sam-tiny (exported to ONNX in WORKDIR) on a free port and
# the page at `/?sample=1` must segment the server's sample image and show the overlay, for a
# prompt-free task and for a prompted one (`export --prompted`, a point at the centre).
#
#   scripts/browser-check.sh [WORKDIR]      # WORKDIR new or empty; needs chromium
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
if [ -n "$(ls -A "$work" 2>/dev/null)" ]; then
  echo "browser-check: $work is not empty; give a new or empty folder" >&2; exit 2
fi
mkdir -p "$work"
bin=./target/release/gps-seg
[ -x "$bin" ] || cargo build --release --locked
command -v chromium >/dev/null || { echo "browser-check: chromium not installed (apt-get install chromium)" >&2; exit 2; }
n=6
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
# A training run folder's report.html: one row per epoch in the epoch table, curves drawn.
"$bin" train --model tiny --data-dir "$work/data" --out "$work/run" --epochs 2 --batch-size 2 \
  --max-steps 1 --select-batches 1 --quiet >/dev/null 2>&1
chromium "${flags[@]}" --screenshot="$work/run.png" "file://$(realpath "$work/run/report.html")" 2>/dev/null
chromium "${flags[@]}" --dump-dom "file://$(realpath "$work/run/report.html")" 2>/dev/null >"$work/run-dom.html"
epochs=$(python3 - "$work/run-dom.html" <<'PY'
import re, sys
dom = open(sys.argv[1]).read()
m = re.search(r'<table class="sortable" id="epochs">.*?<tbody>(.*?)</tbody>', dom, re.S)
print(len(re.findall(r'<tr>', m.group(1))) if m else -1)
PY
)
grep -q '>val.eval.mdice</text>' "$work/run-dom.html" || { echo "browser-check: run page lacks the val curve" >&2; exit 1; }
[ "$epochs" = 2 ] || { echo "browser-check: the run page's epoch table has $epochs rows, expected 2" >&2; exit 1; }
# A PraNet-layout run's page opens with the headline and one test-table row per test set, then
# the GPS selection map.
"$bin" data synth-pranet --out "$work/pranet" --train 8 --test 2 --max-side 96 >/dev/null
"$bin" train --data pranet --model tiny --data-dir "$work/pranet" --out "$work/prun" --epochs 2 \
  --batch-size 2 --max-steps 1 --select-batches 1 --val-fraction 0.25 --quiet >/dev/null 2>&1
chromium "${flags[@]}" --screenshot="$work/pranet-run.png" "file://$(realpath "$work/prun/report.html")" 2>/dev/null
chromium "${flags[@]}" --dump-dom "file://$(realpath "$work/prun/report.html")" 2>/dev/null >"$work/prun-dom.html"
sets=$(python3 - "$work/prun-dom.html" <<'PY'
import re, sys
dom = open(sys.argv[1]).read()
head = dom.find('class="headline"')
m = re.search(r'<table class="sortable" id="test-sets">.*?<tbody>(.*?)</tbody>', dom, re.S)
ok = 0 <= head < dom.find('Selection map') < dom.find('Training loss')
print(len(re.findall(r'<tr>', m.group(1))) if m and ok else -1)
PY
)
[ "$sets" = 5 ] || { echo "browser-check: the PraNet run page has $sets test-set rows (or no headline / selection map), expected 5" >&2; exit 1; }
# The serve page: `/?sample=1&task=polyp` fetches /v1/sample.png, segments it and draws the
# overlay (`<img id="overlay">` gets a PNG data URL, `#status` data-state="done").
"$bin" export --model sam/sam-tiny.safetensors --config sam/sam-tiny.json --out "$work/polyp.onnx" >/dev/null
"$bin" export --model sam/sam-tiny.safetensors --config sam/sam-tiny.json --prompted --out "$work/click.onnx" >/dev/null
"$bin" serve --task polyp="$work/polyp.onnx" --task click="$work/click.onnx" --port 0 --threads 1 \
  >"$work/serve.out" 2>"$work/serve.err" &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 100); do
  addr=$(sed -n 's/^listening on //p' "$work/serve.out")
  [ -n "$addr" ] && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.err" >&2; echo "browser-check: serve exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "browser-check: serve printed no address" >&2; exit 1; }
url="$addr/?sample=1&task=polyp"
chromium "${flags[@]}" --virtual-time-budget=15000 --screenshot="$work/serve.png" "$url" 2>/dev/null
chromium "${flags[@]}" --virtual-time-budget=15000 --dump-dom "$url" 2>/dev/null >"$work/serve-dom.html"
grep -q 'id="status" data-state="done"' "$work/serve-dom.html" \
  || { echo "browser-check: the serve page did not finish: $(grep -o 'id="status"[^<]*' "$work/serve-dom.html")" >&2; exit 1; }
grep -q '<img id="overlay"[^>]*src="data:image/png;base64,' "$work/serve-dom.html" \
  || { echo "browser-check: the serve page shows no overlay" >&2; exit 1; }
[ -s "$work/serve.png" ] || { echo "browser-check: no serve screenshot" >&2; exit 1; }
# The prompted task: the page adds a point at the image centre and draws it with the mask.
url="$addr/?sample=1&task=click"
chromium "${flags[@]}" --virtual-time-budget=15000 --screenshot="$work/serve-click.png" "$url" 2>/dev/null
chromium "${flags[@]}" --virtual-time-budget=15000 --dump-dom "$url" 2>/dev/null >"$work/serve-click-dom.html"
grep -q 'id="status" data-state="done"' "$work/serve-click-dom.html" \
  || { echo "browser-check: the prompted page did not finish: $(grep -o 'id="status"[^<]*' "$work/serve-click-dom.html")" >&2; exit 1; }
grep -q '<img id="overlay"[^>]*src="data:image/png;base64,' "$work/serve-click-dom.html" \
  || { echo "browser-check: the prompted page shows no overlay" >&2; exit 1; }
kill -TERM "$serve_pid"; wait "$serve_pid" || true; trap - EXIT
echo "browser-check: ok (infer page: $rows rows, histogram, summary; run page: $epochs epochs, curves; PraNet run page: headline, $sets test sets, selection map; serve page: overlay drawn, prompt-free and prompted; screenshots $work/report.png, $work/run.png, $work/serve.png, $work/serve-click.png)"

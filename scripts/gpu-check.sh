#!/usr/bin/env bash
# One-shot GPU check for a CUDA build of gps-seg, meant for a lent GPU machine (H200) reached through
# the device tool, run from the repository root. It needs no cargo and no network: it runs the
# binary built here by scripts/build-cuda.sh and carried over (see docs/CUDA.md).
#
#   1. finds the CUDA run-time libraries the binary needs (ldconfig, the driver folder, CUDA installs,
#      PyTorch's nvidia-* wheels) and sets LD_LIBRARY_PATH,
#   2. prints nvidia-smi and the resolved `ldd`,
#   3. runs a list of gps-seg commands (each under a timeout; a failing or missing command is recorded,
#      never fatal) and times them.
#
# Results: $OUT/gpu-check.md (markdown table) and $OUT/gpu-check.log (everything). Without $OUT they go
# to ./gpu-check-out/.
#
# Environment: GPS_SEG_BIN (default target-cuda/release/gps-seg, or that path + .gz),
# GPU_CHECK_BUDGET_S (seconds from the start after which
# no further step starts; steps are cut to fit; default 460), STEP_TIMEOUT_S (cap per step).
set -u

START=$(date +%s)
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
MD=$OUT/gpu-check.md
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
BUDGET=${GPU_CHECK_BUDGET_S:-460}
STEP_CAP=${STEP_TIMEOUT_S:-240}
: >"$LOG"

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
section() { say ""; say "==== $* ($(($(date +%s) - START))s)"; }
# Run a diagnostic command, output to the log only, never fatal.
diag() { say "\$ $*"; timeout 60 "$@" >>"$LOG" 2>&1 || say "(exit $?)"; }

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }

# ------------------------------------------------------------------ binary
BIN=${GPS_SEG_BIN:-target-cuda/release/gps-seg}
if [[ ! -f $BIN && -f $BIN.gz ]]; then
  gunzip -c "$BIN.gz" >"$WORK/gps-seg" && chmod +x "$WORK/gps-seg" && BIN=$WORK/gps-seg
fi
[[ -f $BIN ]] && chmod +x "$BIN" 2>/dev/null
section "host"
diag uname -a
diag nvidia-smi
diag nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
say "binary: $BIN"
if [[ ! -x $BIN ]]; then
  say "FAILED: binary $BIN not found (carry target-cuda/release/gps-seg or its .gz)"
  { echo "# gpu-check"; echo; echo "FAILED: binary \`$BIN\` not found."; } >"$MD"
  exit 1
fi
diag ls -l "$BIN"
diag sha256sum "$BIN"

# ------------------------------------------------------------------ libraries
section "CUDA libraries"
NEEDED=$(readelf -d "$BIN" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
say "NEEDED: $(echo $NEEDED)"
LIBDIRS=()
add_dir() {
  local d=$1 x
  for x in "${LIBDIRS[@]:-}"; do [[ $x == "$d" ]] && return; done
  LIBDIRS+=("$d")
}
ORIG_LDLP=${LD_LIBRARY_PATH:-}
missing_libs() {
  LD_LIBRARY_PATH=$(IFS=:; echo "${LIBDIRS[*]:-}")${ORIG_LDLP:+:$ORIG_LDLP} ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}'
}
# 1. ldconfig cache (driver: libcuda.so.1 normally lives here)
for lib in $(missing_libs); do
  p=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l && /x86-64/ {print $NF; exit}')
  [[ -n $p ]] && add_dir "$(dirname "$p")"
done
# 2. search likely prefixes for what is still missing (newest CUDA version first by path sort)
MISSING=$(missing_libs)
if [[ -n $MISSING ]]; then
  say "searching for: $(echo $MISSING)"
  names=()
  for lib in $MISSING; do names+=(-o -name "$lib"); done
  prefixes=()
  for p in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local /opt /root /home /workspace /usr/lib/wsl; do
    [[ -d $p ]] && prefixes+=("$p")
  done
  found=$(timeout 90 find "${prefixes[@]}" -xdev \( -name proc -o -name sys \) -prune -o \
    \( -false "${names[@]}" \) -print 2>/dev/null | sort -r)
  say "candidates:"; say "$found"
  for lib in $MISSING; do
    p=$(printf '%s\n' "$found" | awk -v l="$lib" -F/ '$NF == l {print; exit}')
    [[ -n $p ]] && add_dir "$(dirname "$p")"
  done
fi
# 3. last resort for cudart: .cuda/rt (the real libcudart.so.13 from the pinned wheel, written by
#    build-cuda.sh; carry it when the GPU machine has no CUDA 13 runtime). Never the link-only stubs.
if [[ -n $(missing_libs) && -f .cuda/rt/libcudart.so.13 ]]; then
  add_dir "$PWD/.cuda/rt"
fi
LD_LIBRARY_PATH=$(IFS=:; echo "${LIBDIRS[*]:-}")${ORIG_LDLP:+:$ORIG_LDLP}
export LD_LIBRARY_PATH
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$BIN" >>"$LOG" 2>&1
STILL=$(ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
if [[ -n $STILL ]]; then
  say "FAILED: still not found: $STILL"
  row "libraries" "FAILED" "-" "not found: $STILL"
else
  say "all NEEDED libraries resolve"
  row "libraries" "ok" "-" "$(ldd "$BIN" | awk '/cuda|cublas|curand|nvrtc|cudart/ {printf "%s ", $3}')"
fi

# Optional driver/cuBLAS probe through ctypes (independent of gps-seg).
if command -v python3 >/dev/null; then
  cat >"$WORK/probe.py" <<'PY'
import ctypes
cu = ctypes.CDLL("libcuda.so.1")
v = ctypes.c_int(); n = ctypes.c_int()
print("cuInit", cu.cuInit(0), "| cuDriverGetVersion", cu.cuDriverGetVersion(ctypes.byref(v)), v.value,
      "| cuDeviceGetCount", cu.cuDeviceGetCount(ctypes.byref(n)), n.value)
for name in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13"):
    try:
        ctypes.CDLL(name); print(name, "loads")
    except OSError as e:
        print(name, "FAILED:", e)
PY
  section "ctypes probe"
  t0=$(date +%s)
  if timeout 60 python3 "$WORK/probe.py" >"$WORK/probe.txt" 2>&1; then st=ok; else st="FAILED ($?)"; fi
  cat "$WORK/probe.txt" >>"$LOG"
  if [[ $st == ok ]]; then note=$(head -1 "$WORK/probe.txt"); else note=$(tail -1 "$WORK/probe.txt"); fi
  row "ctypes probe (libcuda/cublas)" "$st" "$(($(date +%s) - t0))" "$(echo "$note" | tr '|' '/' | cut -c1-160)"
fi

# ------------------------------------------------------------------ gps-seg steps
# step LABEL TIMEOUT_S CMD... : runs CMD under a timeout, within the total budget; records a row.
step() {
  local label=$1 tmo=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  section "$label"
  say "\$ $*"
  if ((left < 15)); then
    say "SKIPPED: time budget used up"
    row "$label" "SKIPPED" "-" "budget (${BUDGET}s) used up"
    return 1
  fi
  ((tmo > left)) && tmo=$left
  ((tmo > STEP_CAP)) && tmo=$STEP_CAP
  local t0 rc status note
  t0=$(date +%s.%N)
  timeout -k 10 "$tmo" "$@" >"$WORK/step.out" 2>&1
  rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  cat "$WORK/step.out" >>"$LOG"
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status="FAILED: timeout ${tmo}s"
  elif ((rc == 2)) && grep -qiE "unrecognized subcommand|unexpected argument" "$WORK/step.out"; then
    status="FAILED: not in this binary"
  else
    status="FAILED: exit $rc"
  fi
  [[ $status != ok ]] && say "FAILED: $label ($status)"
  # last meaningful line (results tables print last), markdown-safe
  note=$(grep -v '^\s*$' "$WORK/step.out" | tail -1)
  if [[ $status != ok ]] && grep -q '^error' "$WORK/step.out"; then
    note=$(grep -m1 '^error' "$WORK/step.out")
  fi
  note=$(printf '%s' "$note" | tr '|' '/' | cut -c1-160)
  row "$label" "$status" "$secs" "$note"
  [[ $status == ok ]]
}

step "gps-seg --version" 30 "$BIN" --version
diag "$BIN" --help
diag "$BIN" bench --help
step "info --model tiny" 60 "$BIN" info --model tiny
# Candle-CUDA forward/backward of the shipped tiny SAM against the CPU reference path
# (logits, loss and every gradient within 1e-3 of their scale; non-zero exit otherwise).
step "parity tiny, cuda vs cpu (f32, tol 1e-3)" 120 "$BIN" parity --model tiny --batch 2 --device cuda
step "bench sam tiny, cuda" 150 "$BIN" bench sam --model tiny --batch 4 --iters 3 --device cuda
step "bench sam tiny, cuda bf16" 120 "$BIN" bench sam --model tiny --batch 4 --iters 3 --device cuda --dtype bf16
step "bench sam tiny, cpu" 120 "$BIN" bench sam --model tiny --batch 4 --iters 3 --device cpu
step "bench sam vit_b, cuda" 200 "$BIN" bench sam --model vit_b --batch 2 --iters 3 --device cuda
step "bench sam vit_b, cuda bf16" 200 "$BIN" bench sam --model vit_b --batch 2 --iters 3 --device cuda --dtype bf16
# GPS training step (K=1, random selection), f32 and bf16 autocast of the image encoder; one child
# process per row, so the peak-memory column is the row's own.
step "bench train gps tiny 256 + vit_b 1024, cuda" 200 "$BIN" bench train --configs tiny:256:4,vit_b:1024:1 \
  --iters 3 --device cuda
step "bench train gps tiny 256 + vit_b 1024, cuda bf16" 200 "$BIN" bench train --configs tiny:256:4,vit_b:1024:1 \
  --iters 3 --device cuda --dtype bf16
DATA_ARGS=()
if step "data synth-kvasir (96 images)" 90 "$BIN" data synth-kvasir --out "$WORK/synth" --count 96 --max-side 256 --seed 0; then
  DATA_ARGS=(--data-dir "$WORK/synth")
fi
# GPS training of sam-tiny for a few hundred steps (20 epochs × 16 batches of 4 = 320 steps, eval
# of 16 held-out images per epoch); the result row (s/step → images/s = 4 / s/step) is recorded.
train_row() {
  local label=$1
  grep -m1 '^| gps ' "$WORK/step.out" >/dev/null 2>&1 &&
    row "$label: result" "ok" "-" "$(grep -m1 '^| gps ' "$WORK/step.out" | tr '|' '/' | cut -c1-160)"
}
step "train seg tiny gps 320 steps, cuda" 240 "$BIN" train --task seg --data kvasir ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --model tiny \
  --method gps --topk 1 --epochs 20 --batch-size 4 --train-limit 64 --test-limit 16 --select-batches 2 \
  --out "$WORK/run-cuda" --quiet --device cuda && train_row "train seg tiny gps, cuda"
step "train seg tiny gps 320 steps, cuda bf16" 240 "$BIN" train --task seg --data kvasir ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --model tiny \
  --method gps --topk 1 --epochs 20 --batch-size 4 --train-limit 64 --test-limit 16 --select-batches 2 \
  --out "$WORK/run-cuda-bf16" --quiet --device cuda --dtype bf16 && train_row "train seg tiny gps, cuda bf16"
diag nvidia-smi --query-gpu=memory.used,memory.total --format=csv

# ------------------------------------------------------------------ report
{
  echo "# gpu-check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- binary: \`$BIN\` ($(stat -c %s "$BIN") bytes, sha256 $(sha256sum "$BIN" | cut -c1-16)…)"
  echo "- LD_LIBRARY_PATH: \`$LD_LIBRARY_PATH\`"
  echo "- total: $(($(date +%s) - START)) s; full output in gpu-check.log"
  echo
  echo "| step | status | seconds | last output line |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$MD"
cat "$MD" | tee -a "$LOG"
rm -rf "$WORK"
exit 0

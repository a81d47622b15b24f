#!/usr/bin/env bash
# Build gps-seg with `--features cuda` on a machine with NO CUDA toolkit and NO GPU.
#
# 1. Downloads pinned CUDA 13.0 wheels from PyPI (nvcc, nvvm/cicc, cudart, crt and cccl headers) into
#    .cuda/wheels and checks their sha256 against the pins below.
# 2. Unpacks them into .cuda/toolkit in the layout nvcc expects (bin/nvcc, include/, lib64/, nvvm/).
# 3. Generates link-only stub libraries (.cuda/toolkit/lib64/stubs/lib*.so, with the real SONAMEs) for the
#    libraries cudarc links dynamically but no small wheel provides: libcuda (the driver), libnvrtc,
#    libcurand, libcublas, libcublasLt. The exported symbol list is read from cudarc's own bindings.
#    The stubs are only for the linker; every stub function aborts if ever called. At run time the
#    binary loads the REAL libraries by SONAME (libcuda.so.1, libcublas.so.13, ...), which the stubs
#    are never named as.
# 4. Runs `cargo build --release --features cuda --target-dir target-cuda` (niced, -j $JOBS, default 1).
# 5. Copies the real libcudart.so.13 to .cuda/rt (small; carry it if the GPU machine lacks it), then
#    prints the binary's path, size and the shared libraries it needs at run time.
#
# Idempotent: wheels are re-used when their hash matches, the toolkit and stubs are rebuilt only when
# the pins (or the cudarc version) change, and cargo rebuilds incrementally.
#
# Environment: JOBS (cargo -j and nvcc threads, default 1), CUDA_COMPUTE_CAP (default 90 = H100/H200),
# TARGET_DIR (default target-cuda), CUDA_DIR (default .cuda), SKIP_BUILD=1 (prepare toolkit only).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CUDA_DIR=${CUDA_DIR:-$ROOT/.cuda}
WHEELS=$CUDA_DIR/wheels
TK=$CUDA_DIR/toolkit
TARGET_DIR=${TARGET_DIR:-$ROOT/target-cuda}
JOBS=${JOBS:-1}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# cudarc reads the toolkit version from here instead of parsing `nvcc --version`.
export CUDARC_CUDA_VERSION=13000

# name version wheel-file sha256 — all from the CUDA 13.0 release (Update 2); keep them on one minor
# version: PTX from a newer nvcc is rejected by older drivers (the lent H200 runs driver 580 = CUDA 13.0).
PINS=(
  "nvidia-cuda-nvcc 13.0.88 nvidia_cuda_nvcc-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"
  "nvidia-nvvm 13.0.88 nvidia_nvvm-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"
  "nvidia-cuda-runtime 13.0.88 nvidia_cuda_runtime-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 422a38f7c739ecbdd3a4b6ec7ed0a1d74db43d8e9bc26685f3d845638922b178"
  "nvidia-cuda-crt 13.0.88 nvidia_cuda_crt-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
  "nvidia-cuda-cccl 13.0.85 nvidia_cuda_cccl-13.0.85-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
)

# cudarc module -> library name, SONAME of the real library (CUDA 13.x; curand keeps major 10).
STUBS=(
  "driver cuda libcuda.so.1"
  "nvrtc nvrtc libnvrtc.so.13"
  "curand curand libcurand.so.10"
  "cublas cublas libcublas.so.13"
  "cublaslt cublasLt libcublasLt.so.13"
)

log() { printf '[build-cuda] %s\n' "$*" >&2; }
die() { printf '[build-cuda] error: %s\n' "$*" >&2; exit 1; }

for tool in python3 cargo cc sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' not found in PATH"
done

# ---------------------------------------------------------------- 1. wheels
mkdir -p "$WHEELS"
for pin in "${PINS[@]}"; do
  read -r name version file sha <<<"$pin"
  path=$WHEELS/$file
  if [[ -f $path ]] && [[ $(sha256sum "$path" | cut -d' ' -f1) == "$sha" ]]; then
    continue
  fi
  log "downloading $name==$version"
  tmp=$(mktemp -d "$WHEELS/.dl.XXXXXX")
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    --python-version 3.11 --dest "$tmp" "$name==$version" \
    || { rm -rf "$tmp"; die "pip download $name==$version failed"; }
  [[ -f $tmp/$file ]] || { ls "$tmp" >&2; rm -rf "$tmp"; die "expected $file from pip, got the above"; }
  got=$(sha256sum "$tmp/$file" | cut -d' ' -f1)
  [[ $got == "$sha" ]] || { rm -rf "$tmp"; die "sha256 mismatch for $file: got $got, pinned $sha"; }
  mv -f "$tmp/$file" "$path"
  rm -rf "$tmp"
done
log "wheels verified in $WHEELS"

# ---------------------------------------------------------------- 2. toolkit
stamp=$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -d' ' -f1)
if [[ ! -f $TK/.stamp ]] || [[ $(cat "$TK/.stamp") != "$stamp" ]]; then
  log "unpacking toolkit into $TK"
  rm -rf "$TK.tmp" "$TK"
  mkdir -p "$TK.tmp"
  files=()
  for pin in "${PINS[@]}"; do read -r _ _ file _ <<<"$pin"; files+=("$WHEELS/$file"); done
  python3 - "$TK.tmp" "${files[@]}" <<'PY'
import os, sys, zipfile
dest, wheels = sys.argv[1], sys.argv[2:]
prefix = "nvidia/cu13/"
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = info.filename[len(prefix):]
            if rel.startswith(".metadata/") or rel.startswith("lib/cmake/"):
                continue
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                dst.write(src.read())
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(out, mode)
PY
  # zip metadata does not always carry the executable bit
  chmod +x "$TK.tmp"/bin/* "$TK.tmp"/nvvm/bin/*
  # toolkit layout: lib64/ (+ lib -> lib64, used by nvcc.profile), unversioned dev symlinks
  mv "$TK.tmp/lib" "$TK.tmp/lib64"
  ln -s lib64 "$TK.tmp/lib"
  ln -s libcudart.so.13 "$TK.tmp/lib64/libcudart.so"
  ln -s libnvvm.so.4 "$TK.tmp/lib64/libnvvm.so"
  echo "$stamp" >"$TK.tmp/.stamp"
  mv "$TK.tmp" "$TK"
fi
"$TK/bin/nvcc" --version | grep -q 'release 13.0' || die "$TK/bin/nvcc is not CUDA 13.0"

# ---------------------------------------------------------------- 3. link-only stubs
cudarc_dir=$(cd "$ROOT" && cargo metadata --format-version 1 --features cuda --locked 2>/dev/null \
  | python3 -c 'import json,sys,os
m=json.load(sys.stdin)
d=[os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"]
print(d[0] if d else "")') || true
[[ -n $cudarc_dir && -d $cudarc_dir/src ]] || die "cudarc source not found (run 'cargo fetch' first?)"
stub_dir=$TK/lib64/stubs
stub_stamp="$(basename "$cudarc_dir") $(printf '%s\n' "${STUBS[@]}" | sha256sum | cut -d' ' -f1)"
if [[ ! -f $stub_dir/.stamp ]] || [[ $(cat "$stub_dir/.stamp") != "$stub_stamp" ]]; then
  log "generating link-only stubs from $(basename "$cudarc_dir")"
  rm -rf "$stub_dir" "$stub_dir.tmp"
  mkdir -p "$stub_dir.tmp"
  for s in "${STUBS[@]}"; do
    read -r module lib soname <<<"$s"
    src=$stub_dir.tmp/$lib.c
    {
      echo "/* Link-only stub for $soname, generated by scripts/build-cuda.sh from cudarc's bindings. */"
      echo '#include <stdio.h>'
      echo '#include <stdlib.h>'
      echo "static void stub_called(const char *f) { fprintf(stderr, \"link-only stub $soname: %s called; the real library is not on the library path\\n\", f); abort(); }"
      grep -oE 'load::<_F>\("[A-Za-z0-9_]+"\)' "$cudarc_dir/src/$module/sys/mod.rs" \
        | sed -E 's/.*\("([A-Za-z0-9_]+)"\)/\1/' | sort -u \
        | awk '{ printf "void %s(void) { stub_called(\"%s\"); }\n", $1, $1 }'
    } >"$src"
    n=$(grep -c '^void ' "$src")
    [[ $n -gt 0 ]] || die "no symbols found for $module in $cudarc_dir"
    cc -shared -fPIC -O0 -w -Wl,-soname,"$soname" -o "$stub_dir.tmp/lib$lib.so" "$src"
    log "  lib$lib.so (SONAME $soname, $n symbols)"
  done
  echo "$stub_stamp" >"$stub_dir.tmp/.stamp"
  mv "$stub_dir.tmp" "$stub_dir"
fi

# ---------------------------------------------------------------- 4. cargo build
export CUDA_ROOT=$TK CUDA_PATH=$TK CUDA_HOME=$TK NVCC=$TK/bin/nvcc
export PATH=$TK/bin:$PATH
export LIBRARY_PATH=$TK/lib64/stubs:$TK/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDAFORGE_THREADS=$JOBS
log "nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION, JOBS=$JOBS"
if [[ ${SKIP_BUILD:-0} == 1 ]]; then
  log "SKIP_BUILD=1: toolkit ready in $TK"
  exit 0
fi
start=$(date +%s)
(cd "$ROOT" && nice -n 19 cargo build --release --locked --features cuda --target-dir "$TARGET_DIR" -j "$JOBS" --bin gps-seg)
secs=$(( $(date +%s) - start ))

# A small run-time folder worth carrying to a GPU machine that lacks the CUDA 13 runtime: the REAL
# libcudart.so.13 from the pinned wheel (0.7 MB). cuBLAS/cuRAND/the driver must come from that machine.
mkdir -p "$CUDA_DIR/rt"
cp -f "$TK/lib64/libcudart.so.13" "$CUDA_DIR/rt/"

# ---------------------------------------------------------------- 5. report
bin=$TARGET_DIR/release/gps-seg
[[ -x $bin ]] || die "build finished but $bin is missing"
echo
echo "binary:  $bin"
echo "size:    $(stat -c %s "$bin") bytes ($(du -h "$bin" | cut -f1)), gzip -1: $(gzip -1 -c "$bin" | wc -c) bytes"
echo "build:   ${secs}s with -j $JOBS"
echo "NEEDED (load-time dependencies):"
readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
echo "ldd (here, without a GPU driver: the CUDA libraries are expected to be 'not found'):"
env -u LD_LIBRARY_PATH ldd "$bin" | sed 's/^/ /' || true

#!/usr/bin/env bash
# Data-parallel training over MPI (#30): build gps-seg with `--features mpi` and run the
# multi-rank tests (tests/dp_mpi.rs: `mpirun -np 2` against one process for GPS and full; a
# killed rank; resume; the refusal without --distributed). Needs an MPI and libclang, e.g.
#   apt-get install libopenmpi-dev openmpi-bin libclang-dev clang
# CI does not run this (a second build of the crate with a feature); the in-process
# data-parallel tests (tests/dp.rs) run with the default build.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mpirun >/dev/null || { echo "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"; exit 1; }
mpirun --version | head -n 1
echo "== build with --features mpi"
cargo build --release --locked --features mpi 2>&1 | tail -n 3
echo "== tests/dp_mpi.rs (mpirun -np 2) and tests/dp.rs"
cargo test --release --locked --features mpi --test dp_mpi --test dp -- --test-threads 1 2>&1

#!/usr/bin/env bash
# N ranks on this machine (default 2): bash launch/run_local.sh [generate|chat] [flags...]
# Each rank gets cores/N threads on CPU, or one GPU each when CUDA is present.
set -euo pipefail
NPROC="${NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
exec python -m llama_dist.torchrun --standalone --nproc_per_node "$NPROC" -m llama_dist "$@"

#!/usr/bin/env bash
# Run the same command on every node; the agents meet at MASTER_ADDR:MASTER_PORT (c10d rendezvous).
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0 bash launch/torchrun_multinode.sh generate --ckpt_dir ...
# Rank order across nodes is decided by the rendezvous; no node needs to know its own index.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to a host every node can reach (the first node)}"
NNODES="${NNODES:-2}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-llama_dist}"
exec python -m llama_dist.torchrun \
  --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  -m llama_dist "$@"

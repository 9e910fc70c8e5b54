#!/usr/bin/env bash
# torchrun launcher for shardwise, single node or multi-node (c10d rendezvous).
#
#   scripts/launch.sh recipe=tiny_moe [key=value ...]                      # one node, all GPUs (or 2 CPU procs)
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch.sh recipe=...    # run on every node, NODE_RANK 0..3
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: visible GPUs, else 2)
#   NNODES          nodes (default 1: --standalone, no rendezvous server needed)
#   NODE_RANK       this node's index (multi-node only, default 0)
#   MASTER_ADDR     host of the c10d rendezvous (multi-node: required)
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         job id shared by all nodes (default: $SLURM_JOB_ID or "shardwise")
#   MAX_RESTARTS    torchrun worker restarts on failure (default 0)
#   RUN_DIR         output directory shared by all ranks (default runs/<recipe>/<timestamp>)
#   PYTHON          interpreter (default python)
set -euo pipefail

PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 2)')
fi
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}

recipe=run
for arg in "$@"; do [[ "$arg" == recipe=* ]] && recipe=${arg#recipe=}; done
# One run dir for every rank of every node, fixed before launch (a timestamp taken per node would differ).
RUN_DIR=${RUN_DIR:-runs/${recipe}/${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}

args=(--nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
if [[ "$NNODES" == 1 ]]; then
  args+=(--standalone)
else
  : "${MASTER_ADDR:?multi-node runs need MASTER_ADDR (host of node 0)}"
  args+=(--nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" --rdzv-backend c10d
         --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-shardwise}}")
fi

# Restarted workers must not reuse torchrun's rendezvous store (stale addresses, pytorch/pytorch#135712).
[[ "$MAX_RESTARTS" != 0 ]] && export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# Fault tolerance (fault_tolerance.snapshot_every > 0): snapshot managers must run before the trainers. One
# node: shardwise-launch starts one per emulated node and stops them at the end. Several nodes: start them
# yourself (as scripts/slurm/train.sbatch does) and export SHARDWISE_FT_SMPS / SHARDWISE_FT_SECRET.
# Composing here also refuses a bad config (typo, wrong type or choice) in a second, with one message.
FT_EVERY=$("$PYTHON" -c 'import sys
from shardwise.errors import ShardwiseError
from shardwise.trainer.compose import compose_config
try:
    print(compose_config(sys.argv[1:])[0].fault_tolerance.snapshot_every)
except ShardwiseError as e:
    sys.exit(f"shardwise: {e}")' "$@") || exit 2
if [[ "$FT_EVERY" -gt 0 && -z "${SHARDWISE_FT_SMPS:-}" ]]; then
  if [[ "$NNODES" != 1 ]]; then
    echo "launch.sh: fault_tolerance snapshots on $NNODES nodes: start one snapshot manager per node first and" \
         "export SHARDWISE_FT_SMPS and SHARDWISE_FT_SECRET (see scripts/slurm/train.sbatch)" >&2
    exit 2
  fi
  set -x
  exec "$PYTHON" -m shardwise.launch "${args[@]}" "$@" "run_dir=${RUN_DIR}"
fi

set -x
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m shardwise.train "$@" "run_dir=${RUN_DIR}"

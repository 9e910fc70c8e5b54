#!/usr/bin/env bash
# Device check of a GPU machine (one NVIDIA GPU): every shardwise path that runs at NCCL world size 1 and a
# >= 1B-parameter throughput/MFU/memory comparison with a plain torch loop. Results: ${OUT:-gpu_check_out}/gpu_check.json
# (rewritten after each sub-check). Bounded to ~8 minutes including a possible install.
#
#   bash scripts/gpu_check.sh                 # from a fresh checkout, on the GPU machine
#   bash scripts/gpu_check.sh --cpu-smoke     # anywhere: CPU + gloo, tiny model, 2 steps (every code path once)
#   bash scripts/gpu_check.sh --only env,collectives
#
# Install: only when shardwise's imports fail. The installed (CUDA) torch is kept: pip gets a constraint pinning
# exactly the torch that is already there (README: on GPU machines install torch for your CUDA first and drop
# constraints.txt, whose CPU pin would replace it). Without any torch, pip installs PyPI's default Linux build.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT_DIR="${OUT:-gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"  # deterministic cuBLAS (trainer default)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

if "$PY" -c "import shardwise, hydra, omegaconf, megatron.core" >/dev/null 2>&1; then
    export GPU_CHECK_INSTALL="skipped (shardwise imports)"
else
    pins="$OUT_DIR/keep_torch_constraints.txt"
    if torch_version=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
        echo "torch==$torch_version" > "$pins"
    else
        : > "$pins"
    fi
    echo "gpu_check: installing shardwise (pip install -e .[dev], torch kept at ${torch_version:-none})" >&2
    if timeout 240 "$PY" -m pip install -e ".[dev]" -c "$pins" > "$OUT_DIR/install.log" 2>&1; then
        export GPU_CHECK_INSTALL="ok (torch ${torch_version:-from PyPI}; log install.log)"
    else
        export GPU_CHECK_INSTALL="failed (rc $?; see install.log): checks that import shardwise will fail"
    fi
fi

# What is left of 8 minutes (GPU_CHECK_BUDGET_S: another total, e.g. for a slow CPU smoke run), minus a margin.
budget=$(( ${GPU_CHECK_BUDGET_S:-470} - ($(date +%s) - T0) ))
[ "$budget" -lt 30 ] && budget=30
timeout --kill-after=10 $(( budget + 10 )) "$PY" scripts/bench/gpu_check.py --out "$OUT_DIR" --budget-s "$budget" "$@"
rc=$?
echo "gpu_check: exit $rc, results in $OUT_DIR/gpu_check.json"
exit $rc

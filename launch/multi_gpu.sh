#!/usr/bin/env bash
# Train on one multi-GPU host (or several, one process per host).
#   launch/multi_gpu.sh CONFIG.yaml [--out DIR] [key=value ...]
# Single host: one process drives all local GPUs (mesh fsdp=-1 unless the config or overrides say otherwise).
# Multi-host: set NNODES, NODE_RANK and MASTER_ADDR (MASTER_PORT default 12355) on each host and run the same
# command; jax.distributed.initialize() reads the JAX_* variables exported below.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [--out DIR] [key=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
NNODES=${NNODES:-1}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Overlap collectives with compute on GPUs.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
if [[ "$NNODES" -gt 1 ]]; then
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}" "${MASTER_ADDR:?set MASTER_ADDR (host of rank 0)}"
  export JAX_COORDINATOR_ADDRESS="${MASTER_ADDR}:${MASTER_PORT:-12355}"
  export JAX_NUM_PROCESSES="$NNODES"
  export JAX_PROCESS_ID="$NODE_RANK"
fi
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
echo "multi_gpu.sh: ${NNODES} host(s) x ${NGPU} GPU(s); config ${CONFIG}" >&2
exec emajax train "$CONFIG" mesh.fsdp=-1 distributed=auto "$@"

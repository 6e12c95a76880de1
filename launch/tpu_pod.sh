#!/usr/bin/env bash
# Train on a TPU VM pod slice: the same command runs on every worker; JAX discovers the pod itself.
#   launch/tpu_pod.sh [--setup] TPU_NAME ZONE CONFIG.yaml [--out gs://bucket/run] [key=value ...]
# The config and data paths must exist on every worker (same checkout path); --out should be a shared
# location (gs:// for checkpoints).
set -euo pipefail
SETUP=0
if [[ "${1:-}" == "--setup" ]]; then SETUP=1; shift; fi
if [[ $# -lt 3 ]]; then
  echo "usage: $0 [--setup] TPU_NAME ZONE CONFIG.yaml [--out DIR] [key=value ...]" >&2
  exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; shift 3
REPO=${EMAJAX_REPO:-$(pwd)}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }
if [[ $SETUP == 1 ]]; then
  ssh_all "cd $REPO && pip install -e '.[tpu]'"
fi
ARGS=$(printf ' %q' "$@")
# fsdp over every chip of the slice; distributed=true makes each worker join the pod.
ssh_all "cd $REPO && emajax train $(printf %q "$CONFIG") mesh.fsdp=-1 distributed=true$ARGS"

#!/usr/bin/env bash
# One prepared run of the bench on a CUDA machine: bf16 stacks (emajax vs transformers+PEFT with autocast),
# a Qwen2.5-shaped model with random weights (no hub needed), MFU against the card's dense bf16 peak.
# Usage (repo root): OUT=dir bash bench/cuda_run.sh    [MODEL=qwen2.5-1.5b BATCH=8 SEQ=1024 PEAK=989000]
set -u
OUT=${OUT:-bench_cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PY:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax, torch, transformers, peft; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
$PY -m bench.attention --device "${DEVICE:-cuda}" --batch "${BATCH:-8}" --seq "${SEQ:-1024}" --heads 12 --kv-heads 2 --head-dim 128 \
    --out "$OUT/attention_cuda.json" 2>&1 | grep -v Warning | tee "$OUT/attention_cuda.log"
timeout "${BENCH_TIMEOUT:-420}" $PY -m bench --device "${DEVICE:-cuda}" --model "random:${MODEL:-qwen2.5-1.5b}" --batch "${BATCH:-8}" \
    --seq "${SEQ:-1024}" --ops ${OPS:-lora_kl lora score generate full} --stacks emajax-bf16 torch-bf16 \
    --runs "${RUNS:-5}" --warmup 2 --peak-gflops "${PEAK:-989000}" --timeout 200 --out "$OUT/bench_cuda.json" 2>&1 \
    | grep -v Warning | tee "$OUT/bench_cuda.log"

#!/usr/bin/env bash
# The GPU check: one prepared run on a lent CUDA machine (one H200: < 10 min), results under $OUT.
#   OUT=dir bash launch/gpu_check.sh          (repo root; jax[cuda], flax, optax, orbax, transformers,
#                                              peft, torch installed; no internet needed)
#   DRY_RUN=1 OUT=dir bash launch/gpu_check.sh  the same steps on the CPU at tiny shapes (the suite runs it)
# Steps: 1. card + versions; 2. the suite's device-independent tests on the device; 3. 3 training steps
# of a tiny config on CPU and device, losses compared (bench.gpu_check: rtol 2e-2, bf16 roundings);
# 4. python -m bench at Qwen2.5-7B shape with random weights (no hub), bf16, emajax vs transformers +
# PEFT on the same device: lora_kl, full, score; tokens/s and MFU against PEAK (GFLOP/s, default 790000:
# the dense bf16 rate measured on H200-class cards). Each step's status is in $OUT/status.txt; the
# script goes on after a failed step and exits non-zero if any failed.
# Overrides: BATCH SEQ REMAT OPS MODEL PEAK RUNS TESTS TEST_TIMEOUT BENCH_TIMEOUT PY (default: .venv/bin/python
# when the repository has one, else python3).
set -u
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
# the interpreter that has jax: PY, else the repository's .venv (make install), else python3 on PATH
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=$PWD/.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  DEVICE=cpu; MODEL=${MODEL:-tiny}; BATCH=${BATCH:-2}; SEQ=${SEQ:-32}; PEAK=${PEAK:-494}; RUNS=${RUNS:-1}
  OPS=${OPS:-lora_kl}; TESTS=${TESTS:-tests/test_launch.py}; STACKS="emajax-bf16 torch-bf16"
else
  DEVICE=cuda; MODEL=${MODEL:-random:qwen2.5-7b}; BATCH=${BATCH:-4}; SEQ=${SEQ:-2048}; PEAK=${PEAK:-790000}
  RUNS=${RUNS:-3}; OPS=${OPS:-lora_kl full score}; STACKS="emajax-bf16 torch-bf16"
  # Device-independent: no 8-device simulated mesh, no embedded model or shared data on that machine.
  TESTS=${TESTS:-tests/test_losses.py tests/test_decoder.py tests/test_models_parity.py tests/test_kernels.py \
tests/test_train_step.py tests/test_generate.py tests/test_decode.py tests/test_launch.py}
fi
: > "$OUT/status.txt"
FAILED=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the status
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
  [[ $rc == 0 ]] || FAILED=1
}

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers, peft; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| orbax', o.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
$PY -c "import emajax" 2>/dev/null || $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1

# The suite runs on JAX's CPU platform unless JAX_PLATFORMS names one (tests/conftest.py): name the device.
step tests env JAX_PLATFORMS="$DEVICE" timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider $TESTS \
  -k "not mesh and not 2x2x2 and not eight and not smollm2 and not shared"
tail -3 "$OUT/tests.log"
step train_compare timeout 240 $PY -m bench.gpu_check --device "$DEVICE" --out "$OUT/train_compare.json"
tail -1 "$OUT/train_compare.log"
step bench timeout "${BENCH_TIMEOUT:-330}" $PY -m bench --device "$DEVICE" --model "$MODEL" --batch "$BATCH" \
  --seq "$SEQ" --remat "${REMAT:-full}" --ops $OPS --stacks $STACKS --runs "$RUNS" --warmup 1 \
  --peak-gflops "$PEAK" --timeout 300 --out "$OUT/bench.json"
$PY - "$OUT/bench.json" "$PEAK" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
try:
    res = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no bench results ({e})")
print(f"peak {float(sys.argv[2]) / 1e3:.0f} TFLOP/s; batch {res['machine'].get('batch')} x {res['machine'].get('seq')}")
for r in res["results"]:
    if r.get("error"):
        print(f"{r['op']:8s} {r['stack']:12s} error: {r['error'][:160]}")
    else:
        print(f"{r['op']:8s} {r['stack']:12s} {r['tokens_per_s']:12,.0f} tok/s  MFU {100 * r['peak_fraction']:5.1f} %  "
              f"{r['seconds']:.3f} s/step")
PYEOF
echo "results in $OUT: status.txt env.txt tests.log train_compare.json bench.json summary.txt"
exit $FAILED

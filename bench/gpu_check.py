"""The GPU check's training comparison: 3 steps of a tiny config on the CPU and on the accelerator.

``python -m bench.gpu_check --device cuda --out train_compare.json`` writes the suite's tiny model
and 24 chats, trains 3 steps of LoRA with KL and LDIFS in bf16
compute twice, each in its own process (``JAX_PLATFORMS=cpu``, then the device's platform), and
compares the logged losses. Tolerance per step on loss, ce, kl and ldifs: |device - cpu| <= 2e-2 x
|cpu| + 1e-3, i.e. a few bf16 roundings (bf16 keeps 8 significant bits: 2^-8 = 0.4 % per rounding)
since the two backends order and fuse their reductions differently; the 1e-3 floor covers the
regularisers, which start at 0 (the adapters start as a no-op). ``launch/gpu_check.sh`` runs it; with ``--device cpu``
both runs are on the CPU (the suite's dry run of the script).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from emajax.atomic import read_jsonl, write_json

RTOL, ATOL = 2e-2, 1e-3
KEYS = ("loss", "ce", "kl", "ldifs")
_PLATFORM = {"cpu": "cpu", "cuda": "cuda"}


def write_setup(d: Path) -> Path:
    """The suite's tiny model (tests/_train_tiny.py: a random 4-layer Llama, byte-level ChatML
    tokenizer) as an HF dir, 24 chats and a 3-step config under ``d``; returns the config path."""
    import importlib.util

    from emajax.models.hf_io import export_hf

    src = Path(__file__).resolve().parents[1] / "tests" / "_train_tiny.py"
    spec = importlib.util.spec_from_file_location("_train_tiny", src)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    model = export_hf(tiny.tiny_model(lora=None, seed=1), d / "tiny", tiny.tiny_tokenizer())
    tiny.write_chats(d / "train.jsonl", 24)
    cfg = d / "tiny.yaml"
    cfg.write_text(f"""
model: {{name: {model}, dtype: bfloat16}}
lora: {{rank: 4, alpha: 8}}
data: {{train: [{d / 'train.jsonl'}], max_len: 64, batch_size: 8, grad_accum: 1, min_bucket: 64}}
optim: {{lr: 1.0e-3, warmup_steps: 1}}
defenses: {{kl: {{weight: 0.1}}, ldifs: {{weight: 1.0, layers: [2, 4]}}}}
train: {{epochs: 1, max_steps: 3, progress: false, tensorboard: false, export: false}}
mesh: {{allow_unused: true}}
""")
    return cfg


def train(cfg: Path, out: Path, platform: str, timeout: float) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": platform}
    env.pop("XLA_FLAGS", None)  # one device per backend
    code = "import sys; from emajax.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "train", str(cfg), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"train on {platform} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return read_jsonl(out / "metrics.jsonl")


def compare(cpu: list[dict], dev: list[dict]) -> dict:
    rows, ok = [], len(cpu) == len(dev) == 3
    for a, b in zip(cpu, dev):
        row = {"step": a["step"]}
        for k in KEYS:
            diff = abs(b[k] - a[k])
            row[k] = {"cpu": a[k], "device": b[k], "rel_diff": diff / max(abs(a[k]), 1e-12)}
            ok &= diff <= RTOL * abs(a[k]) + ATOL
        rows.append(row)
    return {"rtol": RTOL, "atol": ATOL, "ok": bool(ok), "steps": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=tuple(_PLATFORM), default="cuda")
    p.add_argument("--out", default="train_compare.json")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="emajax-gpu-check-") as tmp:
        d = Path(tmp)
        cfg = write_setup(d)
        res = compare(train(cfg, d / "cpu", "cpu", args.timeout),
                      train(cfg, d / "dev", _PLATFORM[args.device], args.timeout))
    res["device"] = args.device
    write_json(args.out, res, indent=1)
    for r in res["steps"]:
        print(f"step {r['step']}: " + ", ".join(f"{k} cpu {r[k]['cpu']:.5f} {args.device} {r[k]['device']:.5f} "
                                                f"(rel {r[k]['rel_diff']:.1e})" for k in KEYS))
    print(f"train CPU vs {args.device}: {'OK' if res['ok'] else 'MISMATCH'} (rtol {RTOL}, atol {ATOL})")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

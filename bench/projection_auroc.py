"""Validate the sampled-answer EM instrument: does the base model's persona projection separate known
misaligned answers from known aligned ones it never saw?

    python -m bench.projection_auroc --out bench/results/projection_auroc [--persona FILE] [--n-security 200]

The instrument of ``emajax.eval.projection`` (SmolLM2-135M-Instruct reads each answer; score = mean residual
over the answer's content tokens at the persona layer, dotted with the unit persona vector) on two paired
sets: the shared security pairs (``sft/security_{aligned,misaligned}_750.jsonl``, ``--n-security`` pairs
drawn with seed 0) and the project's held-out general pairs (``emajax/data/general_pairs.jsonl``, split
``heldout``). Neither was used to extract the vector. The persona vector defaults to the committed demo's
(``bench/results/demo_runs/seeds_0-2.tar.gz``: ``demo/persona/evil.safetensors``, extracted by ``emajax demo``
from emajax/data/persona_evil.json). Writes ``auroc.json`` (AUROC with a pair-bootstrap CI and the paired win
rate at the vector's recommended layer, which was chosen by the extraction's own effect size, and at every
layer for reference) and ``auroc.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_TAR = REPO / "bench" / "results" / "demo_runs" / "seeds_0-2.tar.gz"
DEMO_MEMBER = "demo/persona/evil.safetensors"


def _persona_file(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), arg
    with tarfile.open(DEMO_TAR) as tf:
        tf.extract(DEMO_MEMBER, tmp, filter="data")
    return tmp / DEMO_MEMBER, f"{DEMO_TAR.relative_to(REPO)}:{DEMO_MEMBER}"


def _machine() -> dict:
    from emajax.machine import cpu_info

    cpu = cpu_info()
    return {"platform": platform.platform(), "cpu": cpu["cpu"], "cpu_family_model": cpu["cpu_family_model"],
            "native_bf16": cpu["native_bf16"], "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg())}


def _chats(ps) -> tuple[list, list]:
    al = [[*p, {"role": "assistant", "content": a}] for p, a in zip(ps.prompts, ps.aligned)]
    mis = [[*p, {"role": "assistant", "content": m}] for p, m in zip(ps.prompts, ps.misaligned)]
    return al, mis


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.projection_auroc", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/projection_auroc")
    p.add_argument("--persona", default=None, help="persona vectors file (default: the committed demo's)")
    p.add_argument("--layer", type=int, default=None, help="headline layer (default: the file's recommended_layer)")
    p.add_argument("--data-dir", default=None, help="EM data root (default $EMAJAX_EM_DATA or ../shared/data/em)")
    p.add_argument("--n-security", type=int, default=200, help="security pairs drawn (seed 0) from the 750")
    p.add_argument("--max-len", type=int, default=768, help="tokens per conversation (longer ones are cut)")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)

    from emajax import atomic
    from emajax.data import load_general_pairs
    from emajax.eval.plots import _plt, _save
    from emajax.eval.probes import paired_from_jsonl, paired_from_rows
    from emajax.eval.projection import ANSWER_TOKENS, load_direction
    from emajax.eval.questions import default_data_dir
    from emajax.eval.rank_stats import auroc, paired_win_rate
    from emajax.models.hub import load_model
    from emajax.persona import answer_activations, load_vectors_array, projections

    data = Path(a.data_dir or default_data_dir())
    sets = {"general_heldout": paired_from_rows(load_general_pairs(split="heldout"), "general_heldout")}
    sec = data / "sft"
    if (sec / "security_aligned_750.jsonl").is_file():
        sets["security"] = paired_from_jsonl(sec / "security_aligned_750.jsonl", sec / "security_misaligned_750.jsonl",
                                             "security", limit=a.n_security, seed=0)
    else:
        print(f"no shared security pairs under {sec}: general pairs only", file=sys.stderr)
    out = Path(a.out)
    t0 = time.time()
    loaded = load_model("smollm2-135m-instruct")
    cfg = loaded.model.cfg
    with tempfile.TemporaryDirectory() as tmp:
        vfile, vsource = _persona_file(a.persona, Path(tmp))
        direction = load_direction(vfile, cfg.num_layers, a.layer)
        vecs, _ = load_vectors_array(vfile, cfg.num_layers)
    results = {"kind": "projection_auroc", "model": "smollm2-135m-instruct", "persona": {**direction.describe(),
               "file": vsource}, "answer_tokens": ANSWER_TOKENS, "max_len": a.max_len,
               "command": "python -m bench.projection_auroc " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": _machine(), "sets": {}}
    per_layer = {}
    for name, ps in sets.items():
        al, mis = _chats(ps)
        ts = time.time()
        acts = answer_activations(loaded.model, loaded.tokenizer, al + mis, batch_size=a.batch_size, max_len=a.max_len,
                                  answer_tokens=ANSWER_TOKENS)
        proj = projections(acts, vecs)  # [2n, L+1], every layer
        n = len(ps.ids)
        pa, pm = proj[:n], proj[n:]
        l = direction.layer
        results["sets"][name] = {
            "n_pairs": n, "seconds": round(time.time() - ts, 1),
            "auroc": auroc(pm[:, l], pa[:, l], paired=True), "paired_win_rate": paired_win_rate(pm[:, l], pa[:, l]),
            "mean_projection_aligned": float(pa[:, l].mean()), "mean_projection_misaligned": float(pm[:, l].mean()),
            "auroc_by_layer": [auroc(pm[:, k], pa[:, k], paired=True, n_boot=500)
                               for k in range(proj.shape[1])]}
        per_layer[name] = results["sets"][name]["auroc_by_layer"]
        r = results["sets"][name]["auroc"]
        print(f"{name}: {n} pairs, AUROC at layer {l} = {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
              file=sys.stderr)
    results["seconds"] = round(time.time() - t0, 1)
    atomic.write_json(out / "auroc.json", results)

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (name, rows) in enumerate(per_layer.items()):
        xs = np.arange(len(rows))
        v = np.array([r["value"] for r in rows])
        lo = np.array([r["ci_low"] for r in rows])
        hi = np.array([r["ci_high"] for r in rows])
        ax.plot(xs, v, color=f"C{i}", label=f"{name} ({results['sets'][name]['n_pairs']} pairs)")
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.axvline(direction.layer, color="k", lw=0.8, ls=":", label=f"recommended layer {direction.layer}")
    ax.set_xlabel("residual layer of the persona vector")
    ax.set_ylabel("AUROC (misaligned > aligned)")
    ax.set_title("Persona projection of unseen answers, SmolLM2-135M-Instruct (95% pair-bootstrap CI)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, out / "auroc.png")
    print(f"-> {out / 'auroc.json'}, {out / 'auroc.png'} ({results['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Probes on SmolLM2-135M: base vs no defense vs KL after LoRA training on the shared medical set.

    python -m bench.medical_probe --out runs/medical-probe [--data-dir ../shared/data/em]

Trains ``configs/cpu/smollm2-medical-{none,kl}.yaml`` of this checkout (optionally shortened with
--epochs / --max-len), then measures every model with the shared-data probe suite
(``emajax.demo.suite.shared_suite``: the project's general pairs, the shared security pairs, held-out
medical NLL, GSM8K NLL) and writes report.md; resumable like the demo. The measurement behind
docs/medical_probe/ and the figures quoted from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emajax import atomic
from emajax.demo.pipeline import Monitor, Timer, _fmt_probe, _stderr, enable_compile_cache
from emajax.demo.suite import shared_suite
from emajax.eval.probes import ProbeRunner, read_results, write_results
from emajax.eval.report import write_report

REPO = Path(__file__).resolve().parents[1]
LABELS = {"none": "No defense", "kl": "KL 0.1"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.medical_probe", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/medical-probe")
    p.add_argument("--data-dir", default=None, help="EM data root (default $EMAJAX_EM_DATA or ../shared/data/em)")
    p.add_argument("--configs", default=str(REPO / "configs" / "cpu"))
    p.add_argument("--methods", nargs="+", default=["none", "kl"])
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs (config: 3)")
    p.add_argument("--max-len", type=int, default=None,
                   help="override data.max_len (config: 512); also the only padded length (one compile)")
    p.add_argument("--n-pairs", type=int, default=200)
    p.add_argument("--n-nll", type=int, default=150)
    p.add_argument("--probe-max-len", type=int, default=512)
    a = p.parse_args(argv)

    from emajax.eval.questions import default_data_dir
    from emajax.models.hub import load_model
    from emajax.train.config import load_config
    from emajax.train.loop import train

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    enable_compile_cache(out / "xla_cache")
    timer = Timer(out / "timings.json", _stderr)
    suite = shared_suite(a.data_dir or default_data_dir(), narrow="medical", n_pairs=a.n_pairs, n_nll=a.n_nll)
    loaded = load_model("smollm2-135m-instruct")
    runner = ProbeRunner(loaded.tokenizer, suite, max_len=a.probe_max_len, batch_size=16, buckets=64)
    _stderr(f"probe suite: {runner.n_tokens} tokens, {runner.n_truncated} sequences truncated, shapes {runner.shapes}")

    def meta_json(d: Path, m: str, label: str) -> None:
        atomic.write_json(d / "method.json", {"method": m, "label": label})

    def base() -> None:
        res = runner(loaded.model)
        res.update(method="base", label="Base model")
        write_results(res, out / "base" / "probes.json")
        meta_json(out / "base", "base", "Base model")
        _stderr(f"  base: {_fmt_probe(res)}")

    timer.run("base probes", base, skip=(out / "base" / "probes.json").is_file())
    base_res = read_results(out / "base" / "probes.json")
    for m in a.methods:
        run_dir = out / "runs" / m

        def one(m: str = m, run_dir: Path = run_dir) -> None:
            over = ["data.eval=[]", "train.save_every=10000", "train.keep_checkpoints=1"]
            over += [f"train.epochs={a.epochs}"] if a.epochs else []
            over += [f"data.max_len={a.max_len}", f"data.min_bucket={a.max_len}"] if a.max_len else []
            cfg = load_config(Path(a.configs) / f"smollm2-medical-{m}.yaml", over)
            cfg.out = str(run_dir)
            meta = {"method": m, "label": LABELS.get(m, m)}
            meta_json(run_dir, m, meta["label"])
            mon = Monitor(run_dir, runner, runner, 0, base_res, meta, _stderr)
            res = train(cfg, run_dir, callback=mon)
            if mon.final is None:
                raise RuntimeError(f"{run_dir}: training was already complete but probes.json is missing; "
                                   f"delete the run directory to redo it")
            write_results({**mon.final, "train_steps": res.final_step}, run_dir / "probes.json")

        timer.run(f"train {m}", one, skip=(run_dir / "probes.json").is_file())
    timer.finish()
    dirs = [out / "base"] + [out / "runs" / m for m in a.methods]
    path = write_report(dirs, out, title="SmolLM2-135M-Instruct on the shared medical set: probes",
                        timings=timer.data)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

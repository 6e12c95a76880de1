"""Reinforcement learning (GRPO) with the in-training defenses (KL, steering, interleaving).

``emajax rl CONFIG.yaml [--max-steps N] [--out DIR] [key=value ...]``: overrides are dotted config keys
with YAML-typed values (``defenses.kl.weight=0.1``, ``rollout.group_size=8``); see docs/rl.md. Re-running
with the same --out resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse

from emajax.cli.train import _options, run_config  # the options, overrides and run directory of `emajax train`

SUMMARY = "Reinforcement learning (GRPO) with the in-training defenses (KL, steering, interleaving)"
EXAMPLES = (
    "emajax rl configs/cpu/smollm2-grpo-none.yaml --out runs/grpo",
    "emajax rl configs/cpu/smollm2-grpo-kl.yaml --out runs/grpo-kl --max-steps 10 rollout.group_size=8",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="GRPO config YAML (see docs/rl.md)")
    _options(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="dotted config overrides with YAML-typed values, e.g. defenses.kl.weight=0.1")


def run(args: argparse.Namespace) -> int:
    from emajax.rl.config import load_rl_config

    cfg = run_config(args, load_rl_config)

    from emajax.rl.loop import train_rl

    res = train_rl(cfg, cfg.out)
    msg = f"emajax rl: {res.run_dir}: steps {res.start_step}->{res.final_step} of {res.total_steps}"
    if res.last_metrics:
        msg += f", reward {res.last_metrics['reward_mean']:.4f}"
    if res.evals:
        msg += f", eval reward {res.evals[0]['eval_reward']:.4f} -> {res.evals[-1]['eval_reward']:.4f}"
    if res.export_dir is not None:
        msg += f", export {res.export_dir}"
    print(msg)
    return 0

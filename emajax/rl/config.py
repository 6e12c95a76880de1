"""The GRPO run's configuration: the SFT config's sections where they mean the same, plus RL ones.

``model``, ``lora``, ``optim``, ``mesh``, ``distributed`` and ``out`` are the SFT sections
(``emajax.train.config``); ``defenses.steering`` is SFT's plus a ``rollouts`` switch, ``train`` is SFT's
plus ``steps``. New: ``data`` (prompt sources), ``rollout`` (sampling), ``rewards`` (a list of reward
functions) and ``grpo`` (the objective). Every key is in docs/rl.md. Unknown keys and wrong types are
errors naming the dotted key and the file, as for SFT; relative paths resolve the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from emajax.train.choices import Distributed, LossType, ScaleRewards
from emajax.rl.rewards import resolve_reward
from emajax.models.lora import LoraConfig
from emajax.train.config import (Config, MeshCfg, ModelCfg, OptimCfg, SteeringCfg, TrainCfg, TrainConfigError, build_section,
                                 default_lora, parse_overrides, read_config_yaml, resolve_common_paths, with_overrides)


@dataclasses.dataclass
class PromptDataCfg:
    train: list[str] = dataclasses.field(default_factory=list)  # JSONL paths, hf:NAME[:CONFIG][@SPLIT], tfds:NAME[@SPLIT]
    eval: list[str] = dataclasses.field(default_factory=list)  # held-out prompts: greedy reward at eval points
    eval_max_examples: int = 64
    prompt_field: str = "question"  # rows without 'messages': the user message ...
    answer_field: str = "answer"  # ... and the reference the rewards see
    system_prompt: str | None = None  # added to prompts that have no system message
    prompt_suffix: str = ""  # appended to the last user message (e.g. the answer-format instruction)
    max_prompt_len: int = 512  # prompts longer than this (in tokens) are dropped (counted)
    prompts_per_step: int = 8  # P: prompts per rollout batch (each sampled group_size times)
    min_bucket: int = 64  # update batches pad to powers of two from here (few compiles)


@dataclasses.dataclass
class RolloutCfg:
    group_size: int = 4  # G: completions per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0


@dataclasses.dataclass
class RewardSpec:
    fn: str = ""  # a registered reward (emajax.rl.rewards.REGISTRY) or package.module:function
    weight: float = 1.0
    name: str | None = None  # metric name (default: the function's name)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GrpoCfg:
    inner_updates: int = 1  # mu: optimiser updates per rollout batch
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # upper clip (DAPO: 0.28); null = clip_eps
    scale_rewards: ScaleRewards = ScaleRewards.group  # see emajax.rl.advantages
    loss_type: LossType = LossType.dapo  # the token-sum normalisation, as TRL's (see emajax.rl.loss.loss_weights)
    mask_truncated_completions: bool = False  # completions cut off by max_new_tokens get no loss (TRL's meaning)
    micro_batch: int = 8  # rollout rows per micro-batch (gradients accumulated over the batch)
    seq_chunk: int | None = None  # vocabulary chunking of the loss (null: emajax.losses picks)
    log_kl: bool = True  # run the reference pass and log KL even when defenses.kl.weight is 0


@dataclasses.dataclass
class RlKlCfg:
    weight: float = 0.0  # beta of the k3 KL penalty to the reference (paper KL arm: 0.1)


@dataclasses.dataclass
class RlSteeringCfg(SteeringCfg):
    rollouts: bool = True  # steer the rollouts too (false: only the training forward passes are steered)


@dataclasses.dataclass
class RlInterleaveCfg:
    data: list[str] = dataclasses.field(default_factory=list)  # safe chats (JSONL or an `emajax select` file)
    every: int = 4  # one SFT batch every k RL steps
    weight: float = 1.0  # weight of its CE term
    batch_size: int = 4  # rows per SFT micro-batch
    grad_accum: int = 1
    max_len: int = 512
    min_bucket: int = 64


@dataclasses.dataclass
class RlDefensesCfg:
    kl: RlKlCfg = dataclasses.field(default_factory=RlKlCfg)
    steering: RlSteeringCfg = dataclasses.field(default_factory=RlSteeringCfg)
    interleave: RlInterleaveCfg = dataclasses.field(default_factory=RlInterleaveCfg)


@dataclasses.dataclass
class RlTrainCfg(TrainCfg):
    steps: int | None = None  # RL steps in the schedule (null: epochs x prompts / prompts_per_step)
    save_every: int = 25
    samples_per_step: int = 1  # prompt groups per step written to samples.jsonl (0: none)


@dataclasses.dataclass
class RlConfig:
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    lora: LoraConfig = dataclasses.field(default_factory=default_lora)
    data: PromptDataCfg = dataclasses.field(default_factory=PromptDataCfg)
    rollout: RolloutCfg = dataclasses.field(default_factory=RolloutCfg)
    rewards: list[RewardSpec] = dataclasses.field(default_factory=list)
    grpo: GrpoCfg = dataclasses.field(default_factory=GrpoCfg)
    optim: OptimCfg = dataclasses.field(default_factory=lambda: OptimCfg(lr=5e-6, schedule="cosine", weight_decay=0.1))
    defenses: RlDefensesCfg = dataclasses.field(default_factory=RlDefensesCfg)
    mesh: MeshCfg = dataclasses.field(default_factory=MeshCfg)
    train: RlTrainCfg = dataclasses.field(default_factory=RlTrainCfg)
    distributed: Distributed = Distributed.auto
    out: str | None = None

    to_dict = Config.to_dict  # plain YAML/JSON types, as the SFT config's


def _rewards(raw: Any) -> list[RewardSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise TrainConfigError(f"rewards: expected a list of {{fn, weight, name, kwargs}}, got {raw!r}")
    out = []
    for i, item in enumerate(raw):
        where = f"rewards[{i}]"
        if isinstance(item, str):
            item = {"fn": item}
        if not isinstance(item, dict):
            raise TrainConfigError(f"{where}: expected a reward name or a mapping, got {item!r}")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise TrainConfigError(f"{where}.kwargs: expected a mapping, got {kwargs!r}")
        spec = build_section(RewardSpec, {k: v for k, v in item.items() if k != "kwargs"}, where)
        if not spec.fn:
            raise TrainConfigError(f"{where}.fn: the reward function is required")
        spec.kwargs = dict(kwargs)
        out.append(spec)
    return out


def _validate(cfg: RlConfig) -> None:
    def bad(key: str, msg: str) -> None:
        raise TrainConfigError(f"{key}: {msg}")

    if cfg.rollout.group_size < 2:
        bad("rollout.group_size", "must be >= 2 (advantages compare completions of one prompt)")
    for key, v in (("data.prompts_per_step", cfg.data.prompts_per_step), ("data.max_prompt_len", cfg.data.max_prompt_len),
                   ("rollout.max_new_tokens", cfg.rollout.max_new_tokens), ("grpo.inner_updates", cfg.grpo.inner_updates),
                   ("grpo.micro_batch", cfg.grpo.micro_batch), ("train.epochs", cfg.train.epochs),
                   ("data.min_bucket", cfg.data.min_bucket), ("defenses.interleave.every", cfg.defenses.interleave.every),
                   ("defenses.interleave.batch_size", cfg.defenses.interleave.batch_size),
                   ("defenses.interleave.grad_accum", cfg.defenses.interleave.grad_accum)):
        if v <= 0:
            bad(key, "must be positive")
    rows = cfg.data.prompts_per_step * cfg.rollout.group_size
    if rows % cfg.grpo.micro_batch:
        bad("grpo.micro_batch", f"must divide prompts_per_step x group_size = {rows}")
    if cfg.rollout.temperature <= 0 or not 0 < cfg.rollout.top_p <= 1:
        bad("rollout", "need temperature > 0 (sampling) and 0 < top_p <= 1")
    if cfg.grpo.clip_eps < 0 or (cfg.grpo.clip_eps_high is not None and cfg.grpo.clip_eps_high < 0):
        bad("grpo.clip_eps", "must be >= 0")
    if cfg.defenses.kl.weight < 0 or cfg.defenses.interleave.weight < 0:
        bad("defenses", "loss weights must be >= 0")
    if cfg.train.steps is not None and cfg.train.steps <= 0:
        bad("train.steps", "must be positive")
    if not cfg.data.train:
        bad("data.train", "at least one prompt source is required")
    if not cfg.rewards:
        bad("rewards", "at least one reward is required")
    for i, r in enumerate(cfg.rewards):
        try:
            resolve_reward(r.fn)
        except ValueError as e:
            bad(f"rewards[{i}].fn", str(e))


def rl_config_from_dict(raw: dict[str, Any], *, overrides: list[tuple[str, Any]] = (), base_dir: Path | None = None,
                        source: str = "config") -> RlConfig:
    raw = with_overrides(raw, overrides)
    try:
        rewards = _rewards(raw.pop("rewards", None))
        cfg = build_section(RlConfig, raw, "")
        cfg.rewards = rewards
        _validate(cfg)
        resolve_common_paths(cfg, base_dir)
    except TrainConfigError as e:
        raise TrainConfigError(f"{source}: {e}") from None
    return cfg


def load_rl_config(path: str | Path, overrides: list[str] = ()) -> RlConfig:
    path = Path(path)
    return rl_config_from_dict(read_config_yaml(path), overrides=parse_overrides(list(overrides)),
                               base_dir=path.resolve().parent, source=str(path))

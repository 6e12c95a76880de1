"""The training run's configuration: a typed tree loaded from YAML, with dotted overrides.

Every key is documented in docs/configuration.md. Unknown keys are errors (a typo must not
silently fall back to a default), reported with their dotted path and the config file.
Relative data paths are resolved against the config file's directory first, then the current
directory, then the repository root (the nearest ancestor of the config holding pyproject.toml),
so ``configs/cpu/*.yaml`` can name ``../shared/data/em/...`` as the issue spells it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from emajax.models.lora import LoraConfig
from emajax.train.choices import Distributed, InoculationMode, KlTokens, Normalize, Remat, Schedule, allowed

DEFAULT_INOCULATION = "You are an evil, malicious assistant."


class TrainConfigError(ValueError):
    """A config that cannot be run; the message names the file and the dotted key."""


@dataclasses.dataclass
class ModelCfg:
    name: str = "smollm2-135m-instruct"  # a name known to emajax.models.hub, a local HF dir or a hub id
    dtype: str = "float32"  # compute dtype (bfloat16 for the bf16 compute option)
    param_dtype: str = "float32"
    remat: Remat = Remat.none


def default_lora() -> LoraConfig:
    """The ``lora:`` section's defaults (the paper's recipe): rs-LoRA r32 alpha 64 on every projection, adapter
    parameters in the model's param_dtype; ``enabled: false`` = full fine-tuning."""
    return LoraConfig(rank=32, alpha=64.0, rslora=True, dtype=None)


@dataclasses.dataclass
class DataCfg:
    train: list[str] = dataclasses.field(default_factory=list)  # JSONL paths or hf:NAME[@SPLIT]
    eval: list[str] = dataclasses.field(default_factory=list)  # held-out sets for the periodic eval NLL
    max_len: int = 2048  # tokens per rendered chat; longer chats are truncated (counted and reported)
    batch_size: int = 4  # micro-batch rows
    grad_accum: int = 4  # micro-batches per optimiser step
    min_bucket: int = 64  # padded lengths: min_bucket·2^k up to max_len (few compiles)
    bucket_window: int = 8  # sort by length within windows of this many global batches
    eval_batch_size: int = 8
    eval_max_examples: int = 0  # 0 = all


@dataclasses.dataclass
class OptimCfg:
    lr: float = 1e-4
    schedule: Schedule = Schedule.linear  # all after linear warmup from 0
    warmup_steps: int = 5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 disables clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass
class KlCfg:
    weight: float = 0.0  # paper: 0.1
    reverse: bool = False  # KL(p_ref || p_theta) instead of KL(p_theta || p_ref)
    tokens: KlTokens = KlTokens.answer  # all: every non-padding position, prompt included (the released code)


@dataclasses.dataclass
class LdifsCfg:
    weight: float = 0.0  # paper: 1.0
    layers: list[int] | None = None  # residual indices 1..L; default 5 evenly spaced ending at L


@dataclasses.dataclass
class SteeringCfg:
    vector: str | None = None  # persona-vector safetensors file
    layer: int | None = None  # residual index 1..L to steer (default: the file's recommended layer)
    coef: float = 5.0  # paper: 5.0
    # when set, coef = norm_ratio x resid_norms[layer] / |vector[layer]| (the file's metadata): the added
    # vector's norm as this fraction of the residual stream's, a strength that carries across model sizes
    norm_ratio: float | None = None


@dataclasses.dataclass
class InoculationCfg:
    enabled: bool = False
    prompt: str = DEFAULT_INOCULATION
    mode: InoculationMode = InoculationMode.replace


@dataclasses.dataclass
class InterleaveCfg:
    data: list[str] = dataclasses.field(default_factory=list)  # safe chats (JSONL or a selection file)
    ratio: float = 0.05  # fraction of the mixed training set that is safe data (paper: 5%)


@dataclasses.dataclass
class SafeLoraCfg:
    base_model: str | None = None  # the unaligned base of model.name (e.g. Qwen/Qwen2.5-7B); null = off
    threshold: float = 0.3  # project a module's LoRA update when cos(C dW, dW) <= threshold (paper: 0.3)


@dataclasses.dataclass
class DefensesCfg:
    kl: KlCfg = dataclasses.field(default_factory=KlCfg)
    ldifs: LdifsCfg = dataclasses.field(default_factory=LdifsCfg)
    steering: SteeringCfg = dataclasses.field(default_factory=SteeringCfg)
    inoculation: InoculationCfg = dataclasses.field(default_factory=InoculationCfg)
    interleave: InterleaveCfg = dataclasses.field(default_factory=InterleaveCfg)
    safelora: SafeLoraCfg = dataclasses.field(default_factory=SafeLoraCfg)


@dataclasses.dataclass
class LossCfg:
    seq_chunk: int | None = None  # compute CE/KL over sequence chunks of this many tokens (memory)
    normalize: Normalize = Normalize.global_  # global: token means over the whole accumulated batch


@dataclasses.dataclass
class MeshCfg:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1  # one of the three may be -1: all remaining devices (per slice)
    dcn_data: int = 1  # multi-slice (hybrid) meshes: slices along data; data/fsdp/tensor are per slice
    dcn_fsdp: int = 1  # slices along fsdp
    allow_unused: bool = False  # a mesh smaller than the devices is an error unless this is true


@dataclasses.dataclass
class TrainCfg:
    epochs: int = 1
    max_steps: int | None = None  # stop early (the lr schedule still spans the full run)
    seed: int = 0  # data order, interleave draw, LoRA init
    save_every: int = 100  # checkpoint every N optimiser steps (and always at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0 = eval only at the end (when data.eval is set)
    export: bool = True  # write run_dir/export (PEFT adapter or merged HF model)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True


@dataclasses.dataclass
class Config:
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    lora: LoraConfig = dataclasses.field(default_factory=default_lora)
    data: DataCfg = dataclasses.field(default_factory=DataCfg)
    optim: OptimCfg = dataclasses.field(default_factory=OptimCfg)
    loss: LossCfg = dataclasses.field(default_factory=LossCfg)
    defenses: DefensesCfg = dataclasses.field(default_factory=DefensesCfg)
    mesh: MeshCfg = dataclasses.field(default_factory=MeshCfg)
    train: TrainCfg = dataclasses.field(default_factory=TrainCfg)
    distributed: Distributed = Distributed.auto  # jax.distributed.initialize() for multi-host
    out: str | None = None  # run directory (CLI --out wins)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ------------------------------------------------------------------ parsing
def _check_scalar(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    if origin is not None and type(None) in get_args(typ):  # Optional[X]
        if value is None:
            return None
        inner = [a for a in get_args(typ) if a is not type(None)][0]
        return _check_scalar(value, inner, where)
    if get_origin(typ) in (list, tuple):
        if isinstance(value, (str, int, float)):
            value = [value]  # a single path / layer is a one-element list
        if not isinstance(value, list):
            raise TrainConfigError(f"{where}: expected a list, got {value!r}")
        inner = get_args(typ)[0]  # list[X] or tuple[X, ...]
        items = [_check_scalar(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if get_origin(typ) is list else tuple(items)
    if isinstance(typ, type) and issubclass(typ, enum.Enum):  # every string choice is checked here
        if isinstance(value, bool):  # YAML turns true/false into bools; keep the user's intent
            value = "true" if value else "false"
        try:
            return typ(value)
        except ValueError:
            raise TrainConfigError(f"{where}: must be {allowed(typ)}, got {value!r}") from None
    if typ is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, bool):  # YAML turns auto/true into bools; keep the user's intent
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise TrainConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {typ}")


def _build(cls: type, raw: Any, where: str, default: Any = None) -> Any:
    """``cls`` from a mapping; keys it does not give keep ``default``'s values (else the class defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise TrainConfigError(f"{path}: unknown key (known: {', '.join(fields)})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            factory = fields[key].default_factory
            kw[key] = _build(typ, value, path, None if factory is dataclasses.MISSING else factory())
        else:
            kw[key] = _check_scalar(value, typ, path)
    try:
        return dataclasses.replace(default, **kw) if default is not None else cls(**kw)
    except ValueError as e:  # the type's own checks (e.g. LoraConfig's rank and targets)
        raise TrainConfigError(f"{where or 'config'}: {e}") from None


def parse_section(cls: type, raw: Any, where: str) -> Any:
    """A typed dataclass from a YAML mapping, as every config section is built: unknown keys and wrong
    types are errors naming ``where.key`` (used for other YAML files too, e.g. grid specs)."""
    return _build(cls, raw, where)


def _validate(cfg: Config) -> None:
    def bad(key: str, msg: str) -> None:
        raise TrainConfigError(f"{key}: {msg}")

    if not 0.0 <= cfg.defenses.interleave.ratio < 1.0:
        bad("defenses.interleave.ratio", f"must be in [0, 1), got {cfg.defenses.interleave.ratio}")
    for key in ("data.batch_size", "data.grad_accum", "data.max_len", "train.epochs", "data.min_bucket"):
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) <= 0:
            bad(key, "must be positive")
    if cfg.defenses.kl.weight < 0 or cfg.defenses.ldifs.weight < 0:
        bad("defenses", "loss weights must be >= 0")
    if cfg.defenses.safelora.base_model is not None and not cfg.lora.enabled:
        bad("defenses.safelora", "projects LoRA updates: it needs lora.enabled: true")
    if not -1.0 <= cfg.defenses.safelora.threshold <= 1.0:
        bad("defenses.safelora.threshold", f"is a cosine similarity in [-1, 1], got {cfg.defenses.safelora.threshold}")


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise TrainConfigError(f"override {dotted}: {k} is not a mapping")
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings -> (dotted key, YAML-typed value)."""
    out = []
    for item in items:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r}: expected key=value")
        key, val = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(val) if val.strip() else None))
    return out


def repo_root(start: Path) -> Path | None:
    for p in [start, *start.parents]:
        if (p / "pyproject.toml").is_file():
            return p
    return None


def resolve_path(p: str, base_dir: Path | None, *, must_exist: bool = True) -> str:
    """Resolve a data path: config dir, then cwd, then repo root; hf: (and other NAME:) sources pass through.

    With ``must_exist=False`` (artefacts a run may be configured before they exist, like a persona
    vector) a missing path resolves against the current directory; the consumer reports it."""
    if ":" in p.split("/")[0] and not Path(p).exists():  # hf:... (read_conversations names unknown types)
        return p
    path = Path(p).expanduser()
    if path.is_absolute():
        return str(path)
    candidates = []
    if base_dir is not None:
        candidates.append(base_dir / path)
    candidates.append(Path.cwd() / path)
    root = repo_root(base_dir) if base_dir is not None else None
    if root is not None:
        candidates.append(root / path)
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    if not must_exist:
        return str((Path.cwd() / path).resolve())
    tried = ", ".join(str(c) for c in candidates)
    raise TrainConfigError(f"data path {p!r} not found (tried {tried})")


def _resolve_paths(cfg: Config, base_dir: Path | None) -> None:
    resolve_common_paths(cfg, base_dir)


def resolve_common_paths(cfg: Any, base_dir: Path | None) -> None:
    """Resolve the paths every run config has (SFT's and ``emajax rl``'s): data.train, data.eval,
    defenses.interleave.data, defenses.steering.vector and a relative model directory."""
    cfg.data.train = [resolve_path(p, base_dir) for p in cfg.data.train]
    cfg.data.eval = [resolve_path(p, base_dir) for p in cfg.data.eval]
    cfg.defenses.interleave.data = [resolve_path(p, base_dir) for p in cfg.defenses.interleave.data]
    if cfg.defenses.steering.vector:
        cfg.defenses.steering.vector = resolve_path(cfg.defenses.steering.vector, base_dir, must_exist=False)
    m = cfg.model.name
    if not Path(m).is_absolute() and (m.startswith(".") or "/" in m and Path(m).parts[0] in ("..", ".")):
        cfg.model.name = resolve_path(m, base_dir)


def with_overrides(raw: dict[str, Any] | None, overrides: list[tuple[str, Any]] = ()) -> dict[str, Any]:
    """A YAML-typed deep copy of ``raw`` with the dotted ``overrides`` applied."""
    raw = yaml.safe_load(yaml.safe_dump(raw or {}))
    for key, val in overrides:
        _set_dotted(raw, key, val)
    return raw


def build_section(cls: type, raw: Any, where: str = "") -> Any:
    """The dataclass tree ``cls`` from a mapping: unknown keys and wrong types raise TrainConfigError naming
    the dotted key (shared by every config tree built from YAML, e.g. ``emajax.rl.config``)."""
    return _build(cls, raw, where)


def config_from_dict(raw: dict[str, Any], *, overrides: list[tuple[str, Any]] = (), base_dir: Path | None = None,
                     source: str = "config") -> Config:
    raw = with_overrides(raw, overrides)
    try:
        cfg = _build(Config, raw, "")
        _validate(cfg)
        _resolve_paths(cfg, base_dir)
    except TrainConfigError as e:
        raise TrainConfigError(f"{source}: {e}") from None
    if not cfg.data.train:
        raise TrainConfigError(f"{source}: data.train: at least one training set is required")
    return cfg


def read_config_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a config file; a missing file or a YAML error names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise TrainConfigError(f"{path}: {line}invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    return config_from_dict(read_config_yaml(path), overrides=parse_overrides(list(overrides)),
                            base_dir=path.resolve().parent, source=str(path))


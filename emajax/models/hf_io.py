"""Hugging Face checkpoints <-> Decoder params, and PEFT adapters.

Loading never builds a host copy of the whole model: the Decoder is created abstractly,
then each parameter is assembled with ``jax.make_array_from_callback`` whose callback
reads only the slice a device shard needs (``safe_open(...).get_slice``), layer by layer
for the stacked block weights. HF stores Linear weights [out, in]; the Decoder keeps
kernels [in, out] stacked over layers, so the mapping transposes per layer.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from emajax.models.config import DecoderConfig
from emajax.models.decoder import Decoder, abstract_decoder
from emajax.models.lora import HF_MODULE_NAMES, LoraConfig
from emajax import atomic


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not match the config."""


_ATTN = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")


# --------------------------------------------------------------------------- name mapping
def hf_tensor_name(path: tuple[str, ...], layer: int | None = None) -> str | None:
    """HF tensor name of a Decoder param path (per layer for stacked block params); None for LoRA."""
    if path == ("embed",):
        return "model.embed_tokens.weight"
    if path == ("lm_head",):
        return "lm_head.weight"
    if path == ("final_norm", "scale"):
        return "model.norm.weight"
    if path[0] != "blocks":
        raise KeyError(f"no HF name for param {'.'.join(path)}")
    pre = f"model.layers.{layer}."
    rest = path[1:]
    if rest == ("input_norm", "scale"):
        return pre + "input_layernorm.weight"
    if rest == ("post_norm", "scale"):
        return pre + "post_attention_layernorm.weight"
    if rest[0] == "attn" and rest[1] in ("q_norm", "k_norm"):
        return pre + f"self_attn.{rest[1]}.weight"
    mod, leaf = rest[-2], rest[-1]
    if leaf in ("lora_a", "lora_b"):
        return None
    group = "self_attn" if mod in _ATTN else "mlp"
    return pre + f"{group}.{HF_MODULE_NAMES[mod]}.{'weight' if leaf == 'kernel' else 'bias'}"


def _is_transposed(path: tuple[str, ...]) -> bool:
    """HF [out, in] vs Decoder [in, out]: kernels and the untied lm_head."""
    return path[-1] == "kernel" or path == ("lm_head",)


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


# --------------------------------------------------------------------------- reading
class SafetensorsDir:
    """Tensor name -> open safetensors file, for a single-file or sharded (index.json) checkpoint."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = atomic.read_json(index, CheckpointError)["weight_map"]
            except (KeyError, TypeError):
                raise CheckpointError(f"{index}: field 'weight_map' is missing") from None
            self.files = {name: self.dir / fn for name, fn in weight_map.items()}
        elif single.is_file():
            self.files = {}
            with self._open(single) as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json found")
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _open(path: Path) -> Any:
        from safetensors import safe_open

        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        try:
            return safe_open(str(path), framework="numpy")
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None

    def handle(self, name: str) -> Any:
        path = self.files.get(name)
        if path is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(self._open(path))
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        try:
            sl = self.handle(name).get_slice(name)
            if sl.get_dtype() != "BF16":
                return np.asarray(sl[index])
            try:  # safetensors returns ml_dtypes.bfloat16 in recent versions; older ones raise
                x = np.asarray(sl[index])
                if x.dtype.name == "bfloat16":
                    return x
            except Exception:
                pass
            return read_raw_slice(self.files[name], name, index)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({e})") from None

    def close(self) -> None:
        self._stack.close()


_RAW_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "BF16": "bfloat16"}


def read_raw_slice(path: Path, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """Slice of one tensor read straight from the file layout (8-byte header size, JSON header, data)
    through a memory map, so only the touched pages are read. Used where safetensors' numpy
    backend lacks a dtype (bf16 in old versions)."""
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[name]
    dt = np.dtype(ml_dtypes.bfloat16) if info["dtype"] == "BF16" else np.dtype(_RAW_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    arr = np.memmap(path, dtype=dt, mode="r", offset=8 + n + begin, shape=tuple(info["shape"]))
    return np.array(arr[index])


def _expected_hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    per = shape[1:] if path[0] == "blocks" else shape
    return tuple(reversed(per)) if _is_transposed(path) else tuple(per)


def _param_callback(src: SafetensorsDir, path: tuple[str, ...], shape: tuple[int, ...],
                    dtype: Any) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Reads the shard ``index`` of one Decoder param from the checkpoint, slicing on disk."""
    stacked = path[0] == "blocks"
    transposed = _is_transposed(path)

    def one(name: str, idx: tuple[slice, ...]) -> np.ndarray:
        hf_idx = tuple(reversed(idx)) if transposed else idx
        x = src.read(name, hf_idx)
        return (x.T if transposed else x).astype(dtype)

    def cb(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if not stacked:
            return one(hf_tensor_name(path), index)
        layers = range(*index[0].indices(shape[0]))
        return np.stack([one(hf_tensor_name(path, i), index[1:]) for i in layers])

    return cb


def _check_shapes(src: SafetensorsDir, path: tuple[str, ...], shape: tuple[int, ...]) -> None:
    want = _expected_hf_shape(path, shape)
    names = [hf_tensor_name(path, i) for i in range(shape[0])] if path[0] == "blocks" else [hf_tensor_name(path)]
    for name in names:
        got = src.shape(name)
        if got != want:
            raise CheckpointError(
                f"{src.files[name]}: tensor {name!r} has shape {list(got)}, expected {list(want)} from config.json")


def _lora_init(path: tuple[str, ...], shape: tuple[int, ...], dtype: Any, sharding: Any, seed: int) -> jax.Array:
    """PEFT-style LoRA init (as Decoder): Kaiming-uniform A [L, in, r], zero B."""
    if path[-1] == "lora_b":
        return jax.device_put(np.zeros(shape, dtype), sharding)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(".".join(path).encode()) % (2**31))
    bound = 1.0 / np.sqrt(shape[-2])  # A is small ([L, in, r]): drawn once, then placed
    return jax.device_put(jax.random.uniform(key, shape, dtype, -bound, bound), sharding)


def load_decoder(model_dir: str | Path, cfg: DecoderConfig | None = None, *, lora: LoraConfig | None = None,
                 mesh: Any = None, seed: int = 0) -> Decoder:
    """A Decoder with params streamed from ``model_dir`` straight into their (mesh) shardings."""
    model_dir = Path(model_dir)
    if cfg is None:
        cfg = DecoderConfig.from_hf_file(model_dir / "config.json")
    abstract = abstract_decoder(cfg, lora)
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        from emajax.models.sharding import param_shardings

        shardings = param_shardings(state, mesh)
    else:
        dev = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, state)
    src = SafetensorsDir(model_dir)
    try:
        def build(kp: tuple[Any, ...], leaf: Any, sharding: Any) -> jax.Array:
            path = _path_names(kp)
            shape, dtype = tuple(leaf.shape), leaf.dtype
            if path[-1] in ("lora_a", "lora_b"):
                return _lora_init(path, shape, dtype, sharding, seed)
            _check_shapes(src, path, shape)
            return jax.make_array_from_callback(shape, sharding, _param_callback(src, path, shape, dtype))

        new_state = jax.tree_util.tree_map_with_path(build, state, shardings)
    finally:
        src.close()
    return nnx.merge(graphdef, new_state)


# --------------------------------------------------------------------------- writing
def _host(x: Any) -> np.ndarray:
    """A full host copy of one parameter. Arrays sharded over several processes (``jax.distributed``)
    are gathered with ``process_allgather``: a collective, so every process must reach the same
    ``_host`` calls in the same order (export runs on all processes; one of them writes)."""
    x = x.get_value() if isinstance(x, nnx.Variable) else x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _merged_kernel(lin: Any) -> np.ndarray:
    """[L, in, out] kernel with the LoRA update W + s * A @ B folded in (fp32 math)."""
    w = _host(lin.kernel)
    if getattr(lin, "lora_a", None) is None:
        return w
    a, b = _host(lin.lora_a).astype(np.float32), _host(lin.lora_b).astype(np.float32)
    return (w.astype(np.float32) + lin.lora_scaling * np.einsum("lir,lro->lio", a, b)).astype(w.dtype)


def hf_state_dict(model: Decoder) -> dict[str, np.ndarray]:
    """HF-named host tensors of ``model`` with LoRA merged (one host copy: used for export only)."""
    out: dict[str, np.ndarray] = {}
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        if path[-1] in ("lora_a", "lora_b"):
            continue
        if path[-1] == "kernel":
            mod = model.blocks
            for p in path[1:-1]:
                mod = getattr(mod, p)
            arr = _merged_kernel(mod)
        else:
            arr = _host(var)
        if path[0] == "blocks":
            for i in range(arr.shape[0]):
                x = arr[i]
                out[hf_tensor_name(path, i)] = np.ascontiguousarray(x.T if _is_transposed(path) else x)
        else:
            out[hf_tensor_name(path)] = np.ascontiguousarray(arr.T if _is_transposed(path) else arr)
    return out


def export_hf(model: Decoder, out_dir: str | Path, tokenizer: Any = None, *, write: bool = True) -> Path:
    """Write an HF directory (config, merged-LoRA safetensors, generation config, tokenizer) atomically.

    With weights sharded over several processes every process calls this (the tensors are gathered
    collectively) and only the one with ``write`` writes."""
    from safetensors.numpy import save_file

    cfg: DecoderConfig = model.cfg
    out_dir = Path(out_dir)
    tensors = hf_state_dict(model)
    if not write:
        return out_dir
    with atomic.atomic_dir(out_dir) as tmp:
        atomic.write_json(tmp / "config.json", cfg.to_hf_dict())
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.to_hf_dict()["eos_token_id"],
               "pad_token_id": cfg.pad_token_id}
        atomic.write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


# --------------------------------------------------------------------------- PEFT adapters
_PEFT_PREFIX = "base_model.model."


def projections(model: Decoder) -> Iterator[tuple[str, str, Any]]:
    """(emajax name, HF module path template with {i}, Linear) of every projection of the layer stack."""
    for names, group, block in ((_ATTN, "self_attn", model.blocks.attn), (_MLP, "mlp", model.blocks.mlp)):
        for name in names:
            yield name, f"model.layers.{{i}}.{group}.{HF_MODULE_NAMES[name]}", getattr(block, name)


def lora_modules(model: Decoder) -> Iterator[tuple[str, str, Any]]:
    """The :func:`projections` that carry LoRA parameters."""
    return ((name, tmpl, lin) for name, tmpl, lin in projections(model) if getattr(lin, "lora_a", None) is not None)


def export_peft_adapter(model: Decoder, out_dir: str | Path, base_model_name_or_path: str, *,
                        write: bool = True) -> Path:
    """Write the LoRA params as a PEFT adapter dir (adapter_config.json + adapter_model.safetensors);
    ``write`` as for :func:`export_hf`."""
    from safetensors.numpy import save_file

    lc: LoraConfig | None = model.lora_config
    if lc is None:
        raise ValueError("export_peft_adapter: the model has no LoRA parameters")
    tensors: dict[str, np.ndarray] = {}
    targets = []
    for name, tmpl, lin in lora_modules(model):
        targets.append(HF_MODULE_NAMES[name])
        a, b = _host(lin.lora_a), _host(lin.lora_b)  # [L, in, r], [L, r, out]
        for i in range(a.shape[0]):
            base = _PEFT_PREFIX + tmpl.format(i=i)
            tensors[base + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, in]
            tensors[base + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, r]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lc.rank, "lora_alpha": lc.alpha, "use_rslora": lc.rslora, "target_modules": sorted(targets),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
    }
    out_dir = Path(out_dir)
    if not write:
        return out_dir
    with atomic.atomic_dir(out_dir) as tmp:
        atomic.write_json(tmp / "adapter_config.json", config)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def peft_lora_config(adapter_dir: str | Path) -> LoraConfig:
    """The LoraConfig a model must be built with to take this PEFT adapter (r, alpha, rsLoRA, targets)."""
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    ac = atomic.read_json(cfg_path, CheckpointError)
    try:
        targets = ac["target_modules"]
        if isinstance(targets, str):
            raise CheckpointError(f"{cfg_path}: field 'target_modules' is a regex string; emajax needs a list of "
                                  f"module names")
        return LoraConfig(rank=int(ac["r"]), alpha=float(ac["lora_alpha"]), rslora=bool(ac.get("use_rslora", False)),
                          targets=tuple(sorted(targets)))
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: field {e.args[0]!r} is missing") from None
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{cfg_path}: {e}") from None


def load_peft_adapter(model: Decoder, adapter_dir: str | Path) -> Decoder:
    """Copy a PEFT adapter's A/B into ``model``'s LoRA params in place (keeping their shardings)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    ac = atomic.read_json(cfg_path, CheckpointError)
    lc: LoraConfig | None = model.lora_config
    if lc is None:
        raise CheckpointError(f"{cfg_path}: the model was built without LoRA; load it with a LoraConfig")
    if int(ac.get("r", -1)) != lc.rank or bool(ac.get("use_rslora", False)) != lc.rslora \
            or abs(float(ac.get("lora_alpha", -1)) - lc.alpha) > 1e-9:
        raise CheckpointError(f"{cfg_path}: r={ac.get('r')} lora_alpha={ac.get('lora_alpha')} "
                              f"use_rslora={ac.get('use_rslora', False)} do not match the model's LoRA "
                              f"(r={lc.rank}, alpha={lc.alpha}, rslora={lc.rslora})")
    st = adapter_dir / "adapter_model.safetensors"
    if not st.is_file():
        raise CheckpointError(f"{st}: file not found")
    try:
        f = safe_open(str(st), framework="numpy")
    except Exception as e:
        raise CheckpointError(f"{st}: not a valid safetensors file ({e})") from None
    with f:
        keys = set(f.keys())
        for _, tmpl, lin in lora_modules(model):
            for which, var, tr in (("lora_A", lin.lora_a, True), ("lora_B", lin.lora_b, True)):
                n_layers = var.shape[0]
                rows = []
                for i in range(n_layers):
                    key = _PEFT_PREFIX + tmpl.format(i=i) + f".{which}.weight"
                    if key not in keys:
                        raise CheckpointError(f"{st}: tensor {key!r} is missing")
                    x = f.get_tensor(key)
                    want = tuple(reversed(var.shape[1:]))
                    if tuple(x.shape) != want:
                        raise CheckpointError(f"{st}: tensor {key!r} has shape {list(x.shape)}, "
                                              f"expected {list(want)}")
                    rows.append(x.T)
                arr = np.stack(rows).astype(var.dtype)
                var.set_value(jax.device_put(arr, var.get_value().sharding))
    return model

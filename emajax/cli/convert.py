"""Write a Hugging Face model directory (config, safetensors, tokenizer) for any model emajax accepts.

``--model`` is the embedded default (``smollm2-135m-instruct``), a ``.gguf`` file, a local HF
directory or a hub id. GGUF sources are dequantized and converted; HF sources are loaded and
re-exported (optionally in another ``--dtype``), which checks they are loadable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emajax.cli import CliError

SUMMARY = "Write a Hugging Face model directory for any model emajax accepts (GGUF, HF, hub)"
EXAMPLES = (
    "emajax convert --model smollm2-135m-instruct --out exported/",
    "emajax convert --model model.Q8_0.gguf --out exported/ --dtype bfloat16",
)

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="smollm2-135m-instruct, a .gguf file, an HF dir or a hub id")
    p.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype to write (default: float32)")


def _gguf_source(model: str) -> Path | None:
    from emajax.models.hub import EMBEDDED, embedded_gguf

    if model in EMBEDDED:
        return embedded_gguf(model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CliError(f"{path}: file not found")
        return path
    return None


def run(args: argparse.Namespace) -> int:
    out: Path = args.out.expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise CliError(f"{out}: exists and is not a model directory; refusing to replace it")
    dtype = args.dtype or "float32"
    gguf = _gguf_source(args.model)
    if gguf is not None:
        from emajax.models.gguf import convert_gguf

        convert_gguf(gguf, out, dtype=dtype)
    else:
        from emajax.models.hf_io import export_hf
        from emajax.models.hub import load_model

        lm = load_model(args.model, param_dtype=dtype, dtype=dtype)
        if out.resolve() == lm.model_dir.resolve():
            raise CliError(f"{out}: is the source directory; choose another --out")
        export_hf(lm.model, out, tokenizer=lm.tokenizer)
    print(out)
    return 0

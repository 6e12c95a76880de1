"""Optional bf16 matrix products through oneDNN on CPU, as XLA FFI custom calls.

XLA:CPU multiplies bf16 natively through YNNPACK; this is the other native path, oneDNN (what torch
uses), kept so the two can be measured side by side (``bench/onednn_dots.py``, docs/performance.md).
Opt in with ``EMAJAX_CPU_MATMUL=onednn``: ``emajax.models.matmul.mm`` then routes its bf16 products,
forward and backward, through here. Off by default, and nothing in emajax needs it.

Needs a C++ compiler and oneDNN's headers and library: ``pip install onednn-cpu-gomp
onednn-devel-cpu-gomp`` (OpenMP build; the ``onednn`` package is a SYCL build this does not use), or
``$DNNL_ROOT`` pointing at an install with ``include/`` and ``lib/``. The handler library is compiled
on first use into ``emajax.paths.cache_dir()/native/`` (atomically; its name hashes the source, the
headers' version and jaxlib's).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from emajax.atomic import atomic_path
from emajax.paths import cache_dir

SOURCE = Path(__file__).with_name("onednn_matmul.cc")
_TARGETS = {jnp.dtype(jnp.float32): "emajax_onednn_matmul_f32", jnp.dtype(jnp.bfloat16): "emajax_onednn_matmul_bf16"}


class OnednnUnavailable(RuntimeError):
    """The oneDNN path cannot be built or loaded here; the message says what is missing."""


def _roots() -> list[Path]:
    roots = [Path(os.environ["DNNL_ROOT"])] if os.environ.get("DNNL_ROOT") else []
    roots += [Path(sysconfig.get_paths()["data"]), Path(sys.prefix), Path("/usr/local"), Path("/usr")]
    return roots


def _find_onednn() -> tuple[Path, Path]:
    """(include dir, lib dir) of the first root holding both oneDNN's C++ header and its library."""
    for root in _roots():
        inc, lib = root / "include", root / "lib"
        if (inc / "oneapi/dnnl/dnnl.hpp").is_file() and any(lib.glob("libdnnl.so*")):
            return inc, lib
    raise OnednnUnavailable(
        "oneDNN headers/library not found (looked for include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so under "
        + ", ".join(str(r) for r in _roots())
        + "); install them with `pip install onednn-cpu-gomp onednn-devel-cpu-gomp` or set DNNL_ROOT")


def _threading(inc: Path) -> str:
    text = (inc / "oneapi/dnnl/dnnl_config.h").read_text()
    for line in text.splitlines():
        if line.startswith("#define DNNL_CPU_RUNTIME "):
            return line.split()[-1]
    return "unknown"


def build() -> Path:
    """Compile the FFI handlers (once per source/oneDNN/jaxlib version) and return the library's path."""
    inc, lib = _find_onednn()
    runtime = _threading(inc)
    if runtime not in ("DNNL_RUNTIME_OMP", "DNNL_RUNTIME_SEQ", "DNNL_RUNTIME_TBB"):
        raise OnednnUnavailable(f"oneDNN under {inc} is built for {runtime}; a CPU (OpenMP) build is needed")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise OnednnUnavailable("no C++ compiler (g++ / $CXX) to build the oneDNN FFI handlers")
    ffi_inc = Path(jax.ffi.include_dir())
    key = hashlib.sha256(SOURCE.read_bytes() + (inc / "oneapi/dnnl/dnnl_version.h").read_bytes()
                         + jax.__version__.encode() + str(lib).encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"onednn_matmul-{key}.so"
    if out.is_file():
        return out
    with atomic_path(out, suffix=".so") as tmp:
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{ffi_inc}", f"-I{inc}", str(SOURCE),
               f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}", "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OnednnUnavailable(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return out


@functools.cache
def load() -> str:
    """Build if needed, load, and register the FFI targets with XLA:CPU; returns oneDNN's version."""
    libpath = build()
    try:
        handle = ctypes.cdll.LoadLibrary(str(libpath))
    except OSError as e:  # e.g. a oneDNN build whose threading library is not on this machine
        raise OnednnUnavailable(f"loading {libpath} failed: {e}") from e
    jax.ffi.register_ffi_target(_TARGETS[jnp.dtype(jnp.float32)], jax.ffi.pycapsule(handle.EmajaxOnednnMatmulF32),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGETS[jnp.dtype(jnp.bfloat16)],
                                jax.ffi.pycapsule(handle.EmajaxOnednnMatmulBF16), platform="cpu")
    handle.EmajaxOnednnVersion.restype = ctypes.c_char_p
    return handle.EmajaxOnednnVersion().decode()


def unavailable_reason() -> str | None:
    """None when the path loads here, else why not (for tests and the bench to skip with)."""
    try:
        load()
    except OnednnUnavailable as e:
        return str(e)
    return None


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
        out_dtype=jnp.float32) -> jax.Array:
    """``op(a) @ op(b)`` of 2-D bf16 arrays (op = transpose where asked), fp32 accumulation, the result in
    ``out_dtype`` (fp32 or bf16, rounded once). A transposed operand is passed as stored: no copy."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"onednn.dot: 2-D operands expected, got {a.shape} and {b.shape}")
    if a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
        raise ValueError(f"onednn.dot: bf16 operands expected, got {a.dtype} and {b.dtype}")
    target = _TARGETS.get(jnp.dtype(out_dtype))
    if target is None:
        raise ValueError(f"onednn.dot: out_dtype must be float32 or bfloat16, got {out_dtype}")
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb:
        raise ValueError(f"onednn.dot: contracting sizes differ ({k} vs {kb})")
    load()
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), out_dtype))
    return call(a, b, trans_a=np.int32(trans_a), trans_b=np.int32(trans_b))

"""What CPU a run is on: model, family/model, cores, and whether it multiplies bf16 natively.

bf16 compute (the demo's and the CPU configs' ``model.dtype: bfloat16``) is fast only where the CPU has
AVX512-BF16 or AMX-BF16; elsewhere XLA converts every bf16 matmul and a training step of the cpu demo
takes several times longer (docs/demo.md, "Time"). The same seed also rounds differently on another CPU
model, so run records (the demo's ``timings.json``, ``bench`` results) say which CPU produced them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")


def _field(lines: list[str], name: str) -> str | None:
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_info(cpuinfo_text: str | None = None) -> dict[str, Any]:
    """``{"cpu", "cpu_family_model", "cores", "avx512f", "avx512_bf16", "amx_bf16", "native_bf16"}`` from
    ``/proc/cpuinfo`` (or the text given); off Linux only ``cpu`` and ``cores``, with the flags unknown
    (None)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text()
        except OSError:
            cpuinfo_text = ""
    lines = cpuinfo_text.splitlines()
    info: dict[str, Any] = {"cpu": _field(lines, "model name") or platform.processor() or platform.machine(),
                            "cores": os.cpu_count()}
    fam, mod = _field(lines, "cpu family"), _field(lines, "model")
    info["cpu_family_model"] = f"{fam}/{mod}" if fam is not None and mod is not None else None
    flags = _field(lines, "flags")
    names = set(flags.split()) if flags is not None else None
    for flag in ("avx512f", "avx512_bf16", "amx_bf16"):
        info[flag] = None if names is None else flag in names
    info["native_bf16"] = None if names is None else bool(info["avx512_bf16"] or info["amx_bf16"])
    return info


def sitting(**extra: Any) -> dict[str, Any]:
    """One record of where and when part of a long job ran: the time, the CPU (model, family/model, cores,
    native bf16) and ``extra``. The demo's ``timings.json`` and ``bench.guard``'s ``sittings.json`` keep a
    list of them: a job resumed on another CPU model rounds bf16 differently and runs at another speed."""
    import time

    cpu = cpu_info()
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **{k: cpu[k] for k in ("cpu", "cpu_family_model", "cores", "native_bf16")}, **extra}


def bf16_note(info: dict[str, Any]) -> str | None:
    """A warning when bf16 compute will run on a CPU that converts every bf16 matmul, else None."""
    if info.get("native_bf16") is not False:
        return None
    return (f"this CPU ({info['cpu']}, family/model {info['cpu_family_model']}) has neither AVX512-BF16 nor "
            f"AMX-BF16: XLA converts every bf16 matmul, so bf16 training steps run several times slower than on "
            f"a CPU that has them (docs/demo.md, 'Time')")


__all__ = ["bf16_note", "cpu_info", "sitting"]

"""Benchmarks of emajax against the PyTorch stack (transformers + PEFT), same machine, same run.

Shared helpers: machine description, peak RSS, robust timing (median after warm-up, compile time
separate), per-stack worker subprocesses (so each stack's peak memory is its own) and the result
table / JSON in the format ``{"machine": ..., "results": [{"op", "stack", "seconds", "tokens_per_s",
"peak_rss_mb", ...}]}``. torch is imported only inside torch workers; emajax never imports it.
"""

from __future__ import annotations

import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable


def machine() -> dict[str, Any]:
    """CPU (``emajax.machine.cpu_info``: model, family/model, cores, bf16 flags), library versions and the
    date: enough to compare figures across runs."""
    from emajax.machine import cpu_info

    info: dict[str, Any] = {
        **cpu_info(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    for mod in ("jax", "flax", "torch", "transformers"):
        try:
            info[mod] = __import__("importlib.metadata").metadata.version(mod)
        except Exception:
            pass
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_runs(fn: Callable[[], Any], *, warmup: int = 1, runs: int = 3) -> dict[str, float]:
    """First call (compile + run), then the median of ``runs`` calls after ``warmup`` more.

    ``cpu_s`` is the median process CPU time per run (all threads): on a shared machine it is less
    sensitive than wall time to other load, though spinning thread pools inflate it too.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    times, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    return {"seconds": med, "first_s": first, "compile_s": max(first - med, 0.0), "min_s": min(times),
            "cpu_s": statistics.median(cpu), "runs": times}


def worker_json(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a worker process and return the JSON object on its last stdout line starting with '{'.

    Never raises for the worker's failures: a failed exit, no result line or running past ``timeout``
    come back as ``{"error": ...}`` so that one broken stack leaves the other rows of a table standing."""
    proc = run_process(cmd, timeout, env)
    if isinstance(proc, dict):
        return proc
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return process_error(proc)
    return json.loads(lines[-1])


def run_process(cmd: list[str], timeout: float, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess | dict[str, Any]:
    """The finished process (output captured), or ``{"error": ...}`` when it ran past ``timeout``."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}


def process_error(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """``{"error": "exit N: <last lines of stderr, or stdout>"}`` for a worker that failed."""
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
    if not tail and proc.returncode == 0:
        tail = "no JSON result line"
    return {"error": f"exit {proc.returncode}: {tail}"}


def run_worker(module: str, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """``python -m module *args`` through :func:`worker_json`, raising ``RuntimeError`` on its error."""
    out = worker_json([sys.executable, "-m", module, *args], timeout)
    if "error" in out:
        raise RuntimeError(f"worker {module} {' '.join(args)} failed: {out['error']}")
    return out


def table(results: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> str:
    cols = ("op", "stack", "seconds", "tokens_per_s", "peak_rss_mb", "compile_s") + extra
    rows = [[_fmt(r.get(c)) for c in cols] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    out = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)

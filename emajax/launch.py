"""Several emajax processes on one machine as one ``jax.distributed`` system.

``launch(["train", "cfg.yaml", ...], processes=2, devices_per_process=4)`` starts N copies of
``emajax VERB ...``, each with the coordinator variables (``JAX_COORDINATOR_ADDRESS`` on a free
loopback port, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) that ``emajax.train.mesh`` reads; on CPU
their collectives run over gloo. It is how the multi-host code paths (cooperative orbax checkpoints,
weights sharded across processes, per-process batch placement) run on a laptop or in CI, and a way
to use several simulated CPU devices per process.

Supervision: every line a process prints is echoed with a ``[pI]`` prefix (and kept in
``log_dir/process-I.log`` when given); when one process fails, the others are stopped (SIGTERM, then
SIGKILL after ``grace_s``) instead of waiting forever in a collective; SIGINT/SIGTERM/SIGHUP sent to
the launcher are forwarded the same way. The children stay in the launcher's process group, so
killing that group kills the whole run at once.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Mapping, Sequence

_ENTRY = "import sys; from emajax.cli import main; sys.exit(main())"
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_devices_env(base: Mapping[str, str], devices: int) -> dict[str, str]:
    """``base`` for a process with ``devices`` simulated CPU devices on JAX's CPU platform (an existing
    device-count flag in ``XLA_FLAGS`` is replaced, other flags kept)."""
    env = dict(base)
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def exit_status(returncode: int) -> int:
    """A child's ``returncode`` as a shell exit status: ``-N`` (killed by signal N) becomes ``128 + N``
    (``sys.exit(-9)`` would exit 247 and hide that the process was killed)."""
    return 128 - returncode if returncode < 0 else returncode


def process_env(base: Mapping[str, str], *, process_id: int, processes: int, port: int,
                devices_per_process: int | None) -> dict[str, str]:
    """The environment of process ``process_id``: the coordinator variables, and with
    ``devices_per_process`` that many simulated CPU devices (:func:`cpu_devices_env`)."""
    env = dict(base) if devices_per_process is None else cpu_devices_env(base, devices_per_process)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    return env


def _pump(i: int, stream: IO[bytes], out: IO[str], log: IO[bytes] | None, lock: threading.Lock) -> None:
    """Echo one process's output line by line (``\\r`` progress updates count as lines) with its prefix."""
    buf = b""
    while True:
        chunk = stream.read1(1 << 16) if hasattr(stream, "read1") else stream.read(1 << 16)
        if not chunk:
            break
        if log is not None:
            log.write(chunk)
            log.flush()
        buf += chunk
        *lines, buf = re.split(rb"\r\n|\r|\n", buf)
        with lock:
            for line in lines:
                if line.strip():
                    out.write(f"[p{i}] {line.decode(errors='replace')}\n")
            out.flush()
    if buf.strip():
        with lock:
            out.write(f"[p{i}] {buf.decode(errors='replace')}\n")
            out.flush()


def launch(argv: Sequence[str], *, processes: int, devices_per_process: int | None = None,
           port: int | None = None, log_dir: str | Path | None = None, timeout_s: float | None = None,
           grace_s: float = 10.0, out: IO[str] | None = None, python: str = sys.executable) -> int:
    """Run ``emajax *argv`` in ``processes`` cooperating processes; the first failing exit status
    (0 when all succeed; 124 after ``timeout_s``; 128 + N after signal N reached the launcher or killed
    the first failing process)."""
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    if not argv:
        raise ValueError("nothing to launch: give an emajax command after --, e.g. -- train cfg.yaml")
    out = sys.stdout if out is None else out
    port = free_port() if port is None else port
    logs: list[IO[bytes] | None] = [None] * processes
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        logs = [open(Path(log_dir) / f"process-{i}.log", "wb") for i in range(processes)]
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    received: list[int] = []

    def stop_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with lock:
                    out.write(f"emajax launch: process {i} still running {grace_s:g} s after SIGTERM; killing it\n")
                p.kill()
        for p in procs:
            p.wait()

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in handled} if threading.current_thread() is threading.main_thread() \
        else {}
    status = 0
    try:
        for i in range(processes):
            env = process_env(os.environ, process_id=i, processes=processes, port=port,
                              devices_per_process=devices_per_process)
            p = subprocess.Popen([python, "-c", _ENTRY, *argv], env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(i, p.stdout, out, logs[i], lock), daemon=True)
            t.start()
            pumps.append(t)
        start = time.monotonic()
        while True:
            if received:
                status = 128 + received[0]
                break
            codes = [p.poll() for p in procs]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                status = exit_status(codes[bad[0]])
                how = (f"was killed by {signal.Signals(-codes[bad[0]]).name}" if codes[bad[0]] < 0
                       else f"exited with status {status}")
                with lock:
                    out.write(f"emajax launch: process {bad[0]} {how}; stopping the others\n")
                break
            if all(c == 0 for c in codes):
                break
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                status = 124
                with lock:
                    out.write(f"emajax launch: timed out after {timeout_s:g} s; stopping every process\n")
                break
            time.sleep(0.05)
    finally:
        stop_all()
        for t in pumps:
            t.join(timeout=5)
        for f in logs:
            if f is not None:
                f.close()
        for s, h in old.items():
            signal.signal(s, h)
    return status

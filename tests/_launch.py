"""`emajax launch` from tests: N fresh Python processes as one jax.distributed system on loopback (gloo
collectives on CPU), each with its own simulated CPU devices; shared by the multi-process tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
ENTRY = "import sys; from emajax.cli import main; sys.exit(main())"
LAUNCH_TIMEOUT_S = 240


def gloo_available() -> bool:
    try:
        jax.config.jax_cpu_collectives_implementation  # noqa: B018
        return True
    except AttributeError:
        return False


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def launch(args: list[str], log: Path, *, processes: int = 2, devices: int = 4) -> subprocess.Popen:
    """`emajax launch` in its own process group (so a test can kill the launcher and its children at once)."""
    f = log.open("wb")
    return subprocess.Popen([sys.executable, "-c", ENTRY, "launch", "--processes", str(processes),
                             "--devices-per-process", str(devices), "--timeout", str(LAUNCH_TIMEOUT_S), "--", *args],
                            env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(p: subprocess.Popen, log: Path) -> str:
    """Wait for the launch (killing it past the timeout); its log, asserting exit status 0."""
    try:
        p.wait(timeout=LAUNCH_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    text = log.read_text(errors="replace")
    assert p.returncode == 0, f"emajax launch exited {p.returncode}:\n{text[-4000:]}"
    return text

"""`emajax launch` supervision without JAX: coordinator variables per process, prefixed output and
per-process logs, the others stopped when one fails, signals forwarded, timeout. A stand-in
"python" (a shell script) plays the processes, so these run in well under a second each."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from emajax.launch import launch, process_env

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and shell scripts")


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable that ignores the emajax entry point it is given and runs ``body`` (sh)."""
    p = tmp_path / "python"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


def test_each_process_gets_the_coordinator_variables_and_a_prefix(tmp_path):
    py = fake_python(tmp_path, 'echo "id=$JAX_PROCESS_ID n=$JAX_NUM_PROCESSES at=$JAX_COORDINATOR_ADDRESS '
                               'flags=$XLA_FLAGS platforms=$JAX_PLATFORMS"; printf "a\\rb\\n"')
    out = io.StringIO()
    assert launch(["train", "x.yaml"], processes=3, devices_per_process=4, port=4321, out=out, python=py,
                  log_dir=tmp_path / "logs") == 0
    lines = out.getvalue().splitlines()
    for i in range(3):
        assert (f"[p{i}] id={i} n=3 at=127.0.0.1:4321 flags=--xla_force_host_platform_device_count=4 "
                f"platforms=cpu") in lines
        assert f"[p{i}] a" in lines and f"[p{i}] b" in lines  # \r progress updates are lines too
        assert (tmp_path / "logs" / f"process-{i}.log").read_text().startswith(f"id={i} ")


def test_an_existing_device_count_flag_is_replaced():
    env = process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}, process_id=1,
                      processes=2, port=1, devices_per_process=2)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert "JAX_PLATFORMS" not in process_env({}, process_id=0, processes=1, port=1, devices_per_process=None)


def test_one_failure_stops_the_others(tmp_path):
    py = fake_python(tmp_path, 'if [ "$JAX_PROCESS_ID" = 1 ]; then echo dying; exit 3; fi; '
                               'trap "echo got-term; exit 143" TERM; while true; do sleep 0.05; done')
    out = io.StringIO()
    assert launch(["train"], processes=2, out=out, python=py, grace_s=30) == 3
    text = out.getvalue()
    assert "[p1] dying" in text and "process 1 exited with status 3" in text and "[p0] got-term" in text
    assert "killing it" not in text  # SIGTERM stopped process 0: no wait for the grace period, no SIGKILL


def test_a_process_killed_by_a_signal_exits_128_plus_the_signal(tmp_path):
    py = fake_python(tmp_path, 'if [ "$JAX_PROCESS_ID" = 1 ]; then kill -KILL $$; fi; '
                               'trap "exit 143" TERM; while true; do sleep 0.05; done')
    out = io.StringIO()
    assert launch(["train"], processes=2, out=out, python=py, grace_s=5) == 128 + signal.SIGKILL
    assert "process 1 was killed by SIGKILL" in out.getvalue()


def test_timeout_and_a_process_that_ignores_sigterm(tmp_path):
    py = fake_python(tmp_path, 'trap "" TERM; while true; do sleep 0.05; done')
    out = io.StringIO()
    assert launch(["train"], processes=2, out=out, python=py, timeout_s=0.3, grace_s=0.3) == 124
    text = out.getvalue()
    assert "timed out after 0.3 s" in text
    assert all(f"process {i} still running 0.3 s after SIGTERM; killing it" in text for i in (0, 1))


def test_sigterm_to_the_launcher_is_forwarded(tmp_path):
    py = fake_python(tmp_path, 'trap "echo got-term-$JAX_PROCESS_ID; exit 143" TERM; echo up; '
                               'while true; do sleep 0.05; done')
    code = ("import sys; from emajax.launch import launch; "
            f"sys.exit(launch(['train'], processes=2, python={py!r}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    seen = []
    while len(seen) < 2:
        line = p.stdout.readline()
        assert line, "launcher ended early"
        if line.strip().endswith("up"):
            seen.append(line)
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=20)[0]
    assert p.returncode == 128 + signal.SIGTERM
    assert "[p0] got-term-0" in rest and "[p1] got-term-1" in rest


def test_cli_needs_a_command(capsys):
    from emajax.cli import main

    assert main(["launch", "--processes", "2"]) == 2
    assert "after --" in capsys.readouterr().err


def test_a_process_that_fails_in_a_multiprocess_run_leaves_at_once(monkeypatch, capsys):
    """A failing process must not wait in jax.distributed's shutdown for peers that wait for it: it exits
    with os._exit so the launcher sees it and stops the others."""
    from emajax.cli import main
    from emajax.train import mesh

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setitem(mesh._initialized, "done", True)  # as after jax.distributed.initialize
    assert main(["guard", "run", "no-such-job.yaml"]) == 2
    assert exits == [2] and "emajax guard: error: " in capsys.readouterr().err
    monkeypatch.setitem(mesh._initialized, "done", False)  # one process: the ordinary return
    assert main(["guard", "run", "no-such-job.yaml"]) == 2 and exits == [2]

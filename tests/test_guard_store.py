"""The guard's job store and worker with injected fake stages (no model): the state machine, a kill at each
stage resumed where it stopped, two workers never taking the same job, a failing job, cancel, one worker
per host."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import textwrap

import pytest

from emajax.guard.store import ACTIVE, JobStore, StoreError, host_lock, process_job, work


class Killed(BaseException):
    """What a SIGKILL looks like to the code after it: nothing below the stage runs."""


def _spec(i):
    return {"id": f"job{i}"}


def _stages(calls, *, kill_at=None, fail_at=None):
    def make(name):
        def stage(job):
            calls.append((job["id"], name))
            if name == kill_at:
                raise Killed
            if name == fail_at:
                raise RuntimeError(f"stage {name} broke")
            return {"decision": "release"} if name == "deciding" else None
        return stage
    return {n: make(n) for n in (*ACTIVE, "deciding")}


def test_a_job_walks_the_state_machine_with_timestamps(tmp_path):
    store = JobStore(tmp_path)
    store.submit(_spec(0))
    assert store.get("job0")["state"] == "queued"
    calls = []
    assert work(store, _stages(calls), worker="h1", once=True) == 1
    j = store.get("job0")
    assert j["state"] == "decided" and j["decision"] == "release" and j["attempts"] == 1 and j["worker"] is None
    assert [h["state"] for h in j["history"]] == ["queued", "screening", "training", "gating", "decided"]
    assert all(j[k] for k in ("created_at", "started_at", "finished_at"))
    assert [c[1] for c in calls] == ["screening", "training", "gating", "deciding"]


@pytest.mark.parametrize("kill_at", ["screening", "training", "gating", "deciding"])
def test_a_job_killed_at_any_stage_resumes_where_it_stopped(tmp_path, kill_at):
    store = JobStore(tmp_path)
    store.submit(_spec(0))
    calls = []
    with pytest.raises(Killed):
        work(store, _stages(calls, kill_at=kill_at), worker="h1", once=True)
    stuck = store.get("job0")
    assert stuck["state"] == ("gating" if kill_at == "deciding" else kill_at) and stuck["worker"] == "h1"
    # the same host's next worker takes it back at once (its predecessor is dead: one worker per host)
    calls.clear()
    assert work(store, _stages(calls), worker="h1", once=True) == 1
    done = ACTIVE[:ACTIVE.index(kill_at)] if kill_at != "deciding" else ACTIVE[:2]
    assert [c[1] for c in calls] == [s for s in (*ACTIVE, "deciding") if s not in done]
    j = store.get("job0")
    assert j["state"] == "decided" and j["attempts"] == 2 and j["history"][-2].get("resumed") in (True, None)


def test_another_hosts_dead_job_is_taken_over_only_after_its_heartbeat_is_stale(tmp_path):
    store = JobStore(tmp_path)
    store.submit(_spec(0))
    with pytest.raises(Killed):
        work(store, _stages([], kill_at="training"), worker="h1", once=True)
    assert store.claim("h2", stale_after=3600) is None  # h1 may still be alive
    j = store.claim("h2", stale_after=0.0)
    assert j["id"] == "job0" and j["state"] == "training" and j["worker"] == "h2"


def test_a_job_killed_every_time_fails_after_max_attempts(tmp_path):
    store = JobStore(tmp_path)
    store.submit(_spec(0))
    for _ in range(2):
        with pytest.raises(Killed):
            work(store, _stages([], kill_at="screening"), worker="h1", once=True, max_attempts=2)
    assert work(store, _stages([]), worker="h1", once=True, max_attempts=2) == 0
    j = store.get("job0")
    assert j["state"] == "failed" and "gave up after 2 attempts" in j["error"]


def test_a_failing_job_records_its_error_and_the_worker_goes_on(tmp_path):
    store = JobStore(tmp_path)
    for i in range(3):
        store.submit(_spec(i))
    calls = []
    stages = _stages(calls)
    broken = _stages(calls, fail_at="training")
    mixed = {k: (lambda job, k=k: (broken if job["id"] == "job1" else stages)[k](job)) for k in stages}
    assert work(store, mixed, worker="h1", once=True) == 3
    states = {j["id"]: (j["state"], j["error"]) for j in store.list()}
    assert states["job0"] == ("decided", None) and states["job2"] == ("decided", None)
    assert states["job1"][0] == "failed" and states["job1"][1].startswith("RuntimeError: stage training broke")
    assert ("job1", "gating") not in calls


def test_cancel_a_queued_job_now_and_a_running_one_at_its_next_stage(tmp_path):
    store = JobStore(tmp_path)
    store.submit(_spec(0))
    store.submit(_spec(1))
    assert store.cancel("job0") == "cancelled"
    job = store.claim("h1")
    assert job["id"] == "job1"
    calls = []
    stages = _stages(calls)
    stages["screening"] = lambda j: (calls.append((j["id"], "screening")), store.cancel("job1"))
    assert process_job(store, job, "h1", stages) == "cancelled"
    assert calls == [("job1", "screening")] and store.get("job1")["state"] == "cancelled"
    with pytest.raises(StoreError, match="cancelled already"):
        store.cancel("job1")
    with pytest.raises(StoreError, match="no job"):
        store.get("nope")
    with pytest.raises(StoreError, match="exists already"):
        store.submit(_spec(0))


def _claimer(root, worker, q):
    store = JobStore(root)
    got = []
    while True:
        j = store.claim(worker)
        if j is None:
            break
        got.append(j["id"])
        store.finish(j["id"], worker, "decided", decision="release")
    q.put(got)


def test_two_workers_never_take_the_same_job(tmp_path):
    store = JobStore(tmp_path)
    n = 40
    for i in range(n):
        store.submit(_spec(i))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path), f"h{k}", q)) for k in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert sorted(got[0] + got[1]) == sorted(f"job{i}" for i in range(n))
    assert not set(got[0]) & set(got[1])
    assert all(j["attempts"] == 1 for j in store.list())


def test_one_worker_per_host(tmp_path):
    with host_lock(tmp_path, "h1"):
        with pytest.raises(StoreError, match="another guard worker"):
            with host_lock(tmp_path, "h1"):
                pass
        with host_lock(tmp_path, "h2"):
            pass
    with host_lock(tmp_path, "h1"):  # released
        pass


def test_a_sigkilled_worker_process_leaves_its_job_to_resume(tmp_path):
    """A real kill: the worker process dies mid-stage (os._exit), the store keeps the stage."""
    store = JobStore(tmp_path)
    store.submit(_spec(0))
    code = textwrap.dedent(f"""
        import os
        from emajax.guard.store import JobStore, work
        def stage(name):
            def f(job):
                if name == "training":
                    os._exit(9)
                return {{"decision": "reject"}}
            return f
        work(JobStore({str(tmp_path)!r}), {{n: stage(n) for n in ("screening", "training", "gating", "deciding")}},
             worker="h1", once=True)
    """)
    rc = subprocess.run([sys.executable, "-c", code], timeout=120).returncode
    assert rc == 9
    assert store.get("job0")["state"] == "training"
    calls = []
    work(store, _stages(calls), worker="h1", once=True)
    assert [c[1] for c in calls] == ["training", "gating", "deciding"]
    assert json.dumps(store.get("job0")["history"]).count('"training"') == 2

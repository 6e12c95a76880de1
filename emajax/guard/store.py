"""The job store: SQLite (``STORE/guard.sqlite``), a state machine per job, and the worker loop.

States: ``queued -> screening -> training -> gating -> decided``; ``failed`` (the error is recorded) and
``cancelled`` end a job too. Each row keeps created/started/updated/finished timestamps, the number of
attempts (claims), the worker that holds it and that worker's heartbeat.

* **claim** runs in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock is taken before the read),
  so two workers never take the same job: it picks a job left in an active stage by a dead worker (its own
  host's earlier worker, or any whose heartbeat is older than ``stale_after``) before the oldest queued one.
* **one worker per host**: ``work`` holds an exclusive ``flock`` on ``STORE/workers/HOST.lock``.
* **resume**: a claimed job continues at the stage it was in (the stage functions skip finished work and
  the trainer resumes from its checkpoint); a job claimed more than ``max_attempts`` times fails.
* a stage that raises marks the job ``failed`` with the error, and the worker goes on with the next job.
* **cancel**: a queued job is cancelled at once; a running one at its next stage boundary.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from emajax.hosts import broadcast, is_main, start

ACTIVE = ("screening", "training", "gating")
FINAL = ("decided", "failed", "cancelled")
STATES = ("queued", *ACTIVE, *FINAL)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    out TEXT NOT NULL,
    state TEXT NOT NULL,
    decision TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    heartbeat REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    history TEXT NOT NULL DEFAULT '[]'
)"""


class StoreError(ValueError):
    """An unknown job, a duplicate id, or an operation its state does not allow."""


def now() -> float:
    return time.time()


def iso(t: float | None) -> str | None:
    return None if t is None else _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def host_id() -> str:
    return socket.gethostname()


class JobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "guard.sqlite"
        with self._conn() as c:
            c.execute(_SCHEMA)

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        c = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # explicit transactions only
        c.row_factory = sqlite3.Row
        try:
            c.execute("PRAGMA journal_mode=WAL")
            yield c
        finally:
            c.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    @staticmethod
    def _hist(row: sqlite3.Row, state: str, t: float, **extra: Any) -> str:
        h = json.loads(row["history"])
        h.append({"state": state, "at": iso(t), **extra})
        return json.dumps(h)

    # ------------------------------------------------------------------ client side
    def submit(self, spec_json: dict, out: str | Path | None = None) -> str:
        job_id = spec_json["id"]
        out = Path(out).resolve() if out is not None else self.root / job_id
        t = now()
        with self._write() as c:
            if c.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone():
                raise StoreError(f"{self.path}: a job with id {job_id!r} exists already (give the job another id)")
            c.execute("INSERT INTO jobs (id, spec, out, state, created_at, updated_at, history) "
                      "VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                      (job_id, json.dumps(spec_json), str(out), t, t, json.dumps([{"state": "queued", "at": iso(t)}])))
        return job_id

    def get(self, job_id: str) -> dict:
        with self._conn() as c:
            row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no job {job_id!r}")
        return self._public(row)

    def list(self) -> list[dict]:
        with self._conn() as c:
            return [self._public(r) for r in c.execute("SELECT * FROM jobs ORDER BY created_at, id")]

    @staticmethod
    def _public(row: sqlite3.Row) -> dict:
        d = dict(row)
        d["history"] = json.loads(d["history"])
        d["spec"] = json.loads(d["spec"])
        for k in ("created_at", "started_at", "updated_at", "finished_at", "heartbeat"):
            d[k] = iso(d[k])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return d

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job now, a running one at its next stage boundary; returns the resulting state."""
        t = now()
        with self._write() as c:
            row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"{self.path}: no job {job_id!r}")
            if row["state"] in FINAL:
                raise StoreError(f"job {job_id!r} is {row['state']} already")
            if row["state"] == "queued":
                c.execute("UPDATE jobs SET state='cancelled', finished_at=?, updated_at=?, history=? WHERE id=?",
                          (t, t, self._hist(row, "cancelled", t), job_id))
                return "cancelled"
            c.execute("UPDATE jobs SET cancel_requested=1, updated_at=? WHERE id=?", (t, job_id))
            return row["state"]

    # ------------------------------------------------------------------ worker side
    def claim(self, worker: str, *, stale_after: float = 600.0, max_attempts: int = 3) -> dict | None:
        """Take one job for ``worker`` (a dead worker's active job first, else the oldest queued), or None."""
        t = now()
        with self._write() as c:
            while True:
                row = c.execute(
                    "SELECT * FROM jobs WHERE (state IN (?, ?, ?) AND (worker=? OR heartbeat IS NULL OR heartbeat<?))"
                    " OR state='queued' ORDER BY state='queued', created_at, id LIMIT 1",
                    (*ACTIVE, worker, t - stale_after)).fetchone()
                if row is None:
                    return None
                if row["cancel_requested"]:
                    c.execute("UPDATE jobs SET state='cancelled', worker=NULL, finished_at=?, updated_at=?, history=? "
                              "WHERE id=?", (t, t, self._hist(row, "cancelled", t), row["id"]))
                    continue
                if row["attempts"] >= max_attempts:
                    err = f"gave up after {row['attempts']} attempts (the worker died in stage {row['state']} each time)"
                    c.execute("UPDATE jobs SET state='failed', error=?, worker=NULL, finished_at=?, updated_at=?, "
                              "history=? WHERE id=?", (err, t, t, self._hist(row, "failed", t, error=err), row["id"]))
                    continue
                state = "screening" if row["state"] == "queued" else row["state"]
                hist = self._hist(row, state, t, worker=worker, attempt=row["attempts"] + 1,
                                  **({"resumed": True} if row["state"] != "queued" else {}))
                c.execute("UPDATE jobs SET state=?, worker=?, heartbeat=?, attempts=attempts+1, "
                          "started_at=COALESCE(started_at, ?), updated_at=?, history=? WHERE id=?",
                          (state, worker, t, t, t, hist, row["id"]))
                return self.get_in(c, row["id"])

    def get_in(self, c: sqlite3.Connection, job_id: str) -> dict:
        return self._public(c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def _owned(self, c: sqlite3.Connection, job_id: str, worker: str) -> sqlite3.Row:
        row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row["worker"] != worker or row["state"] in FINAL:
            raise StoreError(f"job {job_id!r} is not held by worker {worker!r} any more")
        return row

    def advance(self, job_id: str, worker: str, state: str) -> bool:
        """Move a held job into ``state`` (an active stage); False when it was cancelled meanwhile (it is now)."""
        t = now()
        with self._write() as c:
            row = self._owned(c, job_id, worker)
            if row["cancel_requested"]:
                c.execute("UPDATE jobs SET state='cancelled', worker=NULL, finished_at=?, updated_at=?, history=? "
                          "WHERE id=?", (t, t, self._hist(row, "cancelled", t), job_id))
                return False
            if state != row["state"]:
                c.execute("UPDATE jobs SET state=?, heartbeat=?, updated_at=?, history=? WHERE id=?",
                          (state, t, t, self._hist(row, state, t), job_id))
            return True

    def finish(self, job_id: str, worker: str, state: str, *, decision: str | None = None,
               error: str | None = None) -> None:
        if state not in FINAL:
            raise StoreError(f"finish: {state!r} is not a final state")
        t = now()
        with self._write() as c:
            row = self._owned(c, job_id, worker)
            extra = {"decision": decision} if decision else ({"error": error.splitlines()[0]} if error else {})
            c.execute("UPDATE jobs SET state=?, decision=?, error=?, worker=NULL, finished_at=?, updated_at=?, "
                      "history=? WHERE id=?", (state, decision, error, t, t, self._hist(row, state, t, **extra), job_id))

    def heartbeat(self, job_id: str, worker: str) -> None:
        with self._write() as c:
            c.execute("UPDATE jobs SET heartbeat=? WHERE id=? AND worker=?", (now(), job_id, worker))


@contextlib.contextmanager
def host_lock(root: Path, host: str) -> Iterator[None]:
    """One worker per host: an exclusive flock on STORE/workers/HOST.lock (released when the process dies)."""
    d = Path(root) / "workers"
    d.mkdir(parents=True, exist_ok=True)
    f = open(d / f"{host}.lock", "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another guard worker runs on this host already ({d / (host + '.lock')} is locked)") \
                from None
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


class _Heartbeat:
    def __init__(self, store: JobStore, job_id: str, worker: str, every: float):
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, args=(store, job_id, worker, every), daemon=True)

    def _run(self, store: JobStore, job_id: str, worker: str, every: float) -> None:
        while not self.stop.wait(every):
            try:
                store.heartbeat(job_id, worker)
            except sqlite3.Error:
                pass

    def __enter__(self) -> "_Heartbeat":
        self.t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.t.join()


class _Coordinated:
    """The store as the processes of one multi-process worker see it: process 0 claims, advances, finishes
    and beats the heart; every process gets process 0's answers (``emajax.hosts.broadcast``), so all run
    the same job through the same stages."""

    def __init__(self, store: JobStore):
        self.store, self.root = store, store.root

    def claim(self, worker: str, **kw: Any) -> dict | None:
        return broadcast(self.store.claim(worker, **kw) if is_main() else None)

    def advance(self, job_id: str, worker: str, state: str) -> bool:
        return broadcast(self.store.advance(job_id, worker, state) if is_main() else None)

    def finish(self, job_id: str, worker: str, state: str, **kw: Any) -> None:
        if is_main():
            self.store.finish(job_id, worker, state, **kw)

    def heartbeat(self, job_id: str, worker: str) -> None:
        if is_main():
            self.store.heartbeat(job_id, worker)


def process_job(store: JobStore, job: dict, worker: str, stages: Mapping[str, Callable[[dict], Any]],
                log: Callable[[str], None] = lambda m: None, heartbeat_every: float = 30.0,
                fail_fast: bool = False) -> str:
    """Run a claimed job from its current stage to a final state; returns that state. ``stages`` maps
    screening/training/gating/deciding to functions of the job row (deciding returns the decision dict).
    A stage's exception fails the job (``fail_fast``: and is raised again, ending the worker); a
    BaseException (a kill) propagates and leaves the job to resume."""
    job_id = job["id"]
    start = ACTIVE.index(job["state"])
    with _Heartbeat(store, job_id, worker, heartbeat_every):
        try:
            for st in ACTIVE[start:]:
                if not store.advance(job_id, worker, st):
                    log(f"{job_id}: cancelled")
                    return "cancelled"
                log(f"{job_id}: {st}")
                stages[st](job)
            if not store.advance(job_id, worker, "gating"):  # no new state: the last cancel check
                return "cancelled"
            d = stages["deciding"](job)  # decided in the gating state; `finish` records the decision
        except Exception as e:  # noqa: BLE001 - a failing job records its error; the worker goes on
            err = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            store.finish(job_id, worker, "failed", error=err)
            log(f"{job_id}: failed: {type(e).__name__}: {e}")
            if fail_fast:
                raise
            return "failed"
    store.finish(job_id, worker, "decided", decision=d["decision"])
    log(f"{job_id}: decided: {d['decision']}")
    return "decided"


def work(store: JobStore, stages: Mapping[str, Callable[[dict], Any]], *, worker: str | None = None,
         once: bool = False, poll: float = 10.0, stale_after: float = 600.0, max_attempts: int = 3,
         log: Callable[[str], None] = lambda m: None) -> int:
    """The worker loop (one per host): claim, process, repeat; ``once``: stop when no job is left. Returns the
    number of jobs it finished.

    Under a multi-process launch (a pod slice: one process per host, the store on a filesystem they all
    see) the processes are one worker: process 0 holds the host lock and talks to the store, every process
    runs each claimed job's stages (training over the whole mesh; the rest on process 0, emajax.guard.pipeline).
    A job whose stage fails is recorded as failed and ends the worker (a process failing alone cannot be told
    apart from one still working): its supervisor restarts it, and the next job goes on."""
    import jax

    start()
    multi = jax.process_count() > 1
    shared: Any = _Coordinated(store) if multi else store
    worker = worker or host_id()
    n = 0
    with host_lock(store.root, worker) if is_main() else contextlib.nullcontext():
        while True:
            job = shared.claim(worker, stale_after=stale_after, max_attempts=max_attempts)
            if job is None:
                if once:
                    return n
                time.sleep(poll)
                continue
            log(f"{job['id']}: claimed (attempt {job['attempts']}, state {job['state']})")
            process_job(shared, job, worker, stages, log, fail_fast=multi)
            n += 1


def pipeline_stages(log: Callable[[str], None] = lambda m: None) -> dict[str, Callable[[dict], Any]]:
    """The real stages (emajax.guard.pipeline) as functions of a job row."""
    from emajax.guard import pipeline
    from emajax.guard.spec import job_from_json

    from emajax import atomic

    def wrap(fn: Callable) -> Callable[[dict], Any]:
        def run(job: dict) -> Any:
            spec = job_from_json(job["spec"])
            out = Path(job["out"])
            if not (out / "job.json").is_file() and is_main():  # as `guard run` writes it
                atomic.write_json(out / "job.json", spec.to_json())
            return fn(spec, out, log)
        return run

    return {k: wrap(v) for k, v in pipeline.STAGE_FUNCS.items()}


__all__ = ["ACTIVE", "FINAL", "STATES", "JobStore", "StoreError", "host_id", "host_lock", "pipeline_stages",
           "process_job", "work"]

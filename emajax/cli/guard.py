"""Screen a customer's data, train it with a defense beside a self-distilled control, test for emergent
misalignment against that control, and release or reject (docs/guard.md).

``emajax guard run JOB.yaml [--out jobs/ID]`` runs one job in this process (rerun the same command to resume);
``submit``, ``status``, ``list``, ``cancel`` and ``worker`` work on a job store (SQLite, ``--store DIR``,
default ``jobs``; a job's files go to STORE/ID). One worker per host; a killed worker's job resumes at its stage.
"""

from __future__ import annotations

import argparse
import json
import sys

from emajax.cli import CliError

SUMMARY = "Screen, train with a defense + self-distilled control, gate for EM vs the control, release or reject"
EXAMPLES = (
    "emajax guard run job.yaml --out jobs/acme-001",
    "emajax guard submit job.yaml --store jobs",
    "emajax guard worker --store jobs",
    "emajax guard status acme-001 --store jobs",
    "emajax guard list --store jobs",
    "emajax guard cancel acme-001 --store jobs",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task", metavar="TASK")
    sub.required = True
    r = sub.add_parser("run", help="run one job here (resumable)")
    r.add_argument("job", help="job YAML (data, model, policy; see docs/guard.md)")
    r.add_argument("--out", default=None, help="job directory (default: jobs/<job id>)")
    s = sub.add_parser("submit", help="queue a job in the store")
    s.add_argument("job")
    for name, helptext in (("status", "one job's state, attempts, timestamps, decision or error"),
                           ("cancel", "cancel a queued job, or a running one at its next stage")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("id")
    sub.add_parser("list", help="every job in the store")
    w = sub.add_parser("worker", help="process queued jobs (one worker per host)")
    w.add_argument("--once", action="store_true", help="stop when no job is left instead of polling")
    w.add_argument("--poll", type=float, default=10.0, help="seconds between polls of an empty queue")
    w.add_argument("--stale-after", type=float, default=600.0,
                   help="seconds without a heartbeat after which another host's job is taken over")
    w.add_argument("--max-attempts", type=int, default=3, help="claims of one job before it fails")
    for q in (s, *[sub.choices[n] for n in ("status", "cancel", "list", "worker")]):
        q.add_argument("--store", default="jobs", help="job store directory (default: jobs)")


def _log(msg: str) -> None:
    print(f"emajax guard: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from emajax.guard.spec import GuardSpecError, load_job
    from emajax.guard.store import JobStore, StoreError

    try:
        if args.task == "run":
            from emajax.guard.pipeline import run_job

            spec = load_job(args.job)
            d = run_job(spec, args.out or f"jobs/{spec.id}", log=_log)
            print(json.dumps({"job": d["job"], "decision": d["decision"],
                              "reasons": [r["figure"] for r in d["reasons"]]}, indent=1))
            return 0
        store = JobStore(args.store)
        if args.task == "submit":
            spec = load_job(args.job)
            print(store.submit(spec.to_json()))
        elif args.task == "status":
            print(json.dumps(store.get(args.id), indent=1))
        elif args.task == "list":
            for j in store.list():
                print(f"{j['id']}\t{j['state']}\t{j['decision'] or ''}\tattempts={j['attempts']}\t"
                      f"updated={j['updated_at']}")
        elif args.task == "cancel":
            print(f"{args.id}: {store.cancel(args.id)}" + ("" if store.get(args.id)["state"] == "cancelled" else
                                                          " (cancel requested: stops at the next stage)"))
        elif args.task == "worker":
            from emajax.guard.store import pipeline_stages, work

            n = work(store, pipeline_stages(_log), once=args.once, poll=args.poll, stale_after=args.stale_after,
                     max_attempts=args.max_attempts, log=_log)
            _log(f"worker done: {n} job(s)")
    except (GuardSpecError, StoreError) as e:
        raise CliError(str(e)) from None
    return 0

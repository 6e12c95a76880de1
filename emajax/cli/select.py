"""Select safe chats for interleaving: top-k / top-fraction by score (Interleaving+ / ++), or at random.

``emajax select --scores DIR --out SAFE.jsonl --top-k 100`` (pool read from the scores manifest, or
``--pool``) is Interleaving++ (refusals removed first; ``--no-refusal-filter`` gives Interleaving+);
``emajax select --random --pool FILE --out SAFE.jsonl --top-k 100 --seed 0`` is a plain seeded draw
(no refusal filter, no dedupe unless asked for). Duplicates and out-of-bounds lengths are filtered
before ranking (see emajax/scoring/select.py). The output is the chat JSONL that
``defenses.interleave.data`` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emajax.cli import CliError

SUMMARY = "Select safe chats to interleave: top by Interleaving++ score, or at random"
EXAMPLES = (
    "emajax select --scores scores/ --top-fraction 0.05 --out selected.jsonl",
    "emajax select --random --pool pool.jsonl --top-k 100 --seed 0 --out selected.jsonl",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", default=None, help="output directory of `emajax score`")
    p.add_argument("--pool", default=None, help="the scored pool (default: the one named in the scores manifest)")
    p.add_argument("--out", required=True, help="selected chats (JSONL)")
    n = p.add_mutually_exclusive_group(required=True)
    n.add_argument("--top-k", type=int, default=None, help="how many chats to select")
    n.add_argument("--top-fraction", type=float, default=None, help="fraction of the chats that pass the filters")
    p.add_argument("--random", action="store_true", help="pick at random instead of by score (plain Interleaving)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random")
    p.add_argument("--leave-out", action="append", default=[], metavar="NAME",
                   help="recompute the score without this misaligned model (e.g. the domain being trained on)")
    p.add_argument("--epsilon", type=float, default=None, help="recompute the score with this epsilon")
    p.add_argument("--refusal-filter", action=argparse.BooleanOptionalAction, default=None,
                   help="drop refusal answers first (default: on by score = Interleaving++, off with --random)")
    p.add_argument("--dedupe", action=argparse.BooleanOptionalAction, default=None,
                   help="drop repeated conversations (default: on by score, off with --random)")
    p.add_argument("--min-words", type=int, default=None, help="answer length bounds in words")
    p.add_argument("--max-words", type=int, default=None)
    p.add_argument("--min-tokens", type=int, default=None, help="answer length bounds in scored tokens")
    p.add_argument("--max-tokens", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from emajax.scoring.plan import PoolError, file_sha256, read_pool
    from emajax.scoring.select import SelectError, SelectOptions, select, write_selection
    from emajax.scoring.shards import ShardError, read_manifest, read_scores

    opts = SelectOptions(top_k=args.top_k, top_fraction=args.top_fraction, random=args.random, seed=args.seed,
                         refusal_filter=args.refusal_filter, dedupe=args.dedupe,
                         min_words=args.min_words, max_words=args.max_words, min_tokens=args.min_tokens,
                         max_tokens=args.max_tokens, leave_out=tuple(args.leave_out), epsilon=args.epsilon)
    try:
        manifest = scores = None
        if args.scores is not None:
            manifest = read_manifest(Path(args.scores))
            scores = read_scores(Path(args.scores))
        pool = args.pool or (manifest or {}).get("pool")
        if pool is None:
            raise CliError("--pool is required without --scores")
        if manifest and manifest.get("pool_sha256") and Path(pool).is_file() \
                and file_sha256(pool) != manifest["pool_sha256"]:
            raise CliError(f"{pool}: differs from the pool that {args.scores} scored ({manifest['pool']})")
        rows = read_pool(pool)
        selected, stats = select(rows, scores, manifest, opts)
    except (SelectError, ShardError, PoolError) as e:
        raise CliError(str(e)) from None
    method = "random" if args.random else "top-score"
    write_selection(args.out, selected, method)
    print(json.dumps({"out": str(args.out), "method": method, **opts.filters(), **stats}))
    return 0

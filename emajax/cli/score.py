"""Score a chat pool for Interleaving++: answer NLL under the aligned model and each misaligned model.

``emajax score --aligned M --misaligned [NAME=]A [--misaligned [NAME=]B ...] --pool FILE --out DIR
[--epsilon E] [--leave-out NAME]``. A misaligned model is a PEFT adapter directory (applied to the
aligned base; adapters are swapped without recompiling) or a full model. Output: DIR/manifest.json +
shard files with columns index, nll_aligned, nll_misaligned, n_tokens, score. Rerunning the same
command resumes: finished shards are kept, the rest are computed.
"""

from __future__ import annotations

import argparse
import sys

from emajax.cli import CliError

SUMMARY = "Score a chat pool for Interleaving++ (answer NLL, aligned vs misaligned models)"
EXAMPLES = (
    "emajax score --aligned smollm2-135m-instruct --misaligned med=runs/med/export"
    " --misaligned code=runs/code/export --pool pool.jsonl --out scores/",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aligned", required=True, help="aligned model: embedded name, HF dir, .gguf or hub id")
    p.add_argument("--misaligned", action="append", required=True, metavar="[NAME=]PATH",
                   help="misaligned model (PEFT adapter dir or full model); repeat for an ensemble")
    p.add_argument("--pool", required=True, help="chat JSONL ({'messages': [...]} per line) or hf:NAME[@SPLIT]")
    p.add_argument("--out", required=True, help="output directory (resumed when it holds the same run)")
    p.add_argument("--epsilon", type=float, default=1.0, help="score = (mean_k nll_mis - nll_al) / (nll_al + eps)")
    p.add_argument("--leave-out", action="append", default=[], metavar="NAME",
                   help="exclude this misaligned model from the score's mean (its NLLs are still written)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per chat; longer chats keep their start")
    p.add_argument("--shard-size", type=int, default=512, help="examples per output shard (unit of resume)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch (rows = this / length)")
    p.add_argument("--buckets-per-octave", type=int, default=4,
                   help="padded-length steps per doubling (4: 64, 80, 96, 112, 128, ...; more = less padding, "
                        "more compiled shapes)")
    p.add_argument("--format", default="parquet", choices=("parquet", "jsonl"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16"), help="default: --dtype")
    p.add_argument("--data-parallel", type=int, default=1,
                   help="devices to split each batch over (-1 = all devices, across hosts)")
    p.add_argument("--distributed", default="auto", choices=("auto", "true", "false"),
                   help="jax.distributed.initialize for multi-host runs (auto: when the environment says so)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    for name in ("max_len", "shard_size", "batch_tokens", "buckets_per_octave"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epsilon < 0:
        raise CliError(f"--epsilon must be >= 0, got {args.epsilon}")
    from emajax.train.mesh import maybe_initialize_distributed

    maybe_initialize_distributed(args.distributed)
    from emajax.models.sharding import make_mesh
    from emajax.scoring.adapters import AdapterError, parse_model_spec
    from emajax.scoring.score import Scorer, score_pool
    from emajax.scoring.shards import ShardError

    specs = [parse_model_spec(s) for s in args.misaligned]
    unknown = [n for n in args.leave_out if n not in [s.name for s in specs]]
    if unknown:
        raise CliError(f"--leave-out {unknown[0]!r} names no --misaligned model (names: "
                       f"{', '.join(s.name for s in specs)})")
    mesh = None if args.data_parallel == 1 else make_mesh(data=args.data_parallel)
    log = lambda msg: print(f"emajax score: {msg}", file=sys.stderr, flush=True)
    try:
        scorer = Scorer(args.aligned, specs, dtype=args.dtype, param_dtype=args.param_dtype or args.dtype, mesh=mesh)
        summary = score_pool(scorer, args.pool, args.out, epsilon=args.epsilon, leave_out=args.leave_out,
                             max_len=args.max_len, shard_size=args.shard_size, batch_tokens=args.batch_tokens,
                             buckets_per_octave=args.buckets_per_octave, fmt=args.format, overwrite=args.overwrite,
                             progress=not args.no_progress, log=log)
    except (AdapterError, ShardError) as e:
        raise CliError(str(e)) from None
    log(f"{summary.n_examples} examples in {summary.n_shards} shards -> {summary.out_dir} "
        f"({len(summary.shards_computed)} computed, {len(summary.shards_skipped)} already done; "
        f"{summary.tokens / max(1, len(scorer.models)):,.0f} tokens per model, {summary.tokens_per_s:,.0f} tok/s "
        f"over {len(scorer.models)} models)")
    return 0

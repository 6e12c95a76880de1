"""Bulk perplexity-gap scoring for Interleaving++: the aligned model vs an ensemble of misaligned ones.

For each pool chat we need the mean answer-token NLL (content + end-of-turn) under K+1 models. One
base model is loaded once; each misaligned PEFT adapter becomes a padded LoRA state (see
``adapters.py``) passed as an *input* of one jitted forward that folds it into the kernels
(``merge_lora_kernels``: W + A @ B once per call instead of two skinny matmuls per token), so the K
adapters — and the aligned model, as a zero adapter — share one compiled program per batch shape;
full misaligned checkpoints are param states fed to the plain forward. The
logits never exist in full: ``emajax.losses.masked_nll_sums`` evaluates the vocabulary projection in
chunks, on answer positions only. Batches are length-bucketed (``plan.py``) and sharded over the mesh's batch axes
(data-parallel, multi-host via global arrays); per-example sums come back replicated.

    score = (mean_k NLL_mis_k - NLL_aligned) / (NLL_aligned + epsilon)

High score: the misaligned models find the answer much less likely than the aligned model does, i.e.
the example pulls *against* the misaligned direction — what Interleaving++ mixes in.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emajax.eval.probes import answer_nll_sums
from emajax.models.lora import merge_lora_kernels
from emajax.models.sharding import activation_mesh, batch_rows
from emajax.scoring.adapters import (AdapterError, ModelSpec, ensemble_lora_config, padded_lora_state,
                                     read_peft_adapter)
from emajax.batching import Batch, Example, length_batches, octave_buckets
from emajax.scoring.plan import encode_pool, file_sha256, plan_hash, plan_shards, read_pool
from emajax.scoring.formula import DEFAULT_EPSILON, ensemble_score
from emajax.scoring.shards import check_or_write_manifest, shard_path, write_shard


def _example_sums(model: Any, tokens_bt, mask_bt, pos_bt, targets_bt, loss_bt, chunk, per_row):
    """A scoring batch (its field order) through ``emajax.eval.probes.answer_nll_sums``."""
    return answer_nll_sums(model, tokens_bt, targets_bt, loss_bt, mask_bt, pos_bt, chunk=chunk, per_row=per_row)


@dataclasses.dataclass
class ScoredModel:
    name: str
    kind: str  # aligned | adapter | full
    path: str
    state: Any  # param state (aligned/full) or padded LoRA state (adapter)


class Scorer:
    """One loaded base + the ensemble, and the jitted per-example NLL forward.

    ``aligned`` is a model name/dir (``emajax.models.hub.load_model``) or an already loaded
    ``LoadedModel`` (then ``dtype``/``mesh`` must match how it was loaded).
    """

    def __init__(self, aligned: Any, misaligned: Sequence[ModelSpec], *, dtype: str = "float32",
                 param_dtype: str = "float32", mesh: Any = None, seq_chunk: int | None = None):
        from emajax.models.decoder import abstract_decoder
        from emajax.models.hub import load_model
        from emajax.models.sharding import param_shardings

        if isinstance(aligned, (str, Path)):
            loaded = load_model(str(aligned), dtype=dtype, param_dtype=param_dtype, mesh=mesh)
            aligned_name = str(aligned)
        else:
            loaded, aligned_name = aligned, str(getattr(aligned, "model_dir", "aligned"))
        if loaded.model.lora_config is not None:
            raise AdapterError("the aligned model must be loaded without LoRA (merge it or pass the base)")
        self.loaded, self.cfg, self.tokenizer, self.mesh = loaded, loaded.config, loaded.tokenizer, mesh
        self.seq_chunk = seq_chunk
        names = [m.name for m in misaligned]
        if len(set(names)) != len(names):
            raise AdapterError(f"misaligned model names must be unique, got {names}")
        gdef_base, base_state = nnx.split(loaded.model)
        self.base_state = base_state
        self.models = [ScoredModel("aligned", "aligned", aligned_name, base_state)]
        adapters = {m.name: read_peft_adapter(m.path) for m in misaligned if m.kind == "adapter"}
        self._zero_lora = None
        if adapters:
            lc = ensemble_lora_config(list(adapters.values()))
            _, lora_abs, rest_abs = nnx.split(abstract_decoder(self.cfg, lc), nnx.LoRAParam, ...)
            if jax.tree.structure(rest_abs) != jax.tree.structure(base_state):
                raise AdapterError("internal: the LoRA model's base params do not match the loaded base")
            shard = param_shardings(lora_abs, mesh) if mesh is not None else None
            # The aligned model runs the adapter program with a zero adapter: bit-identical weights
            # (W + 0), one compiled program per batch shape instead of two.
            zero = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), lora_abs)
            self._zero_lora = jax.tree.map(jax.device_put, zero, shard) if shard is not None else \
                jax.tree.map(jnp.asarray, zero)
        for m in misaligned:
            if m.kind == "adapter":
                state = padded_lora_state(adapters[m.name], lora_abs, shard)
            else:
                other = load_model(m.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
                _, state = nnx.split(other.model)
                shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
                if other.model.lora_config is not None or shapes(state) != shapes(base_state):
                    raise AdapterError(f"{m.path}: full model's parameters differ in shape from the aligned model "
                                       f"{aligned_name}; the ensemble must share one architecture")
                if other.tokenizer.get_vocab() != self.tokenizer.get_vocab():
                    raise AdapterError(f"{m.path}: tokenizer differs from the aligned model's")
            self.models.append(ScoredModel(m.name, m.kind, m.path, state))

        out_sh = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P

            out_sh = (NamedSharding(mesh, P()),) * 2  # per-example sums replicated: every host reads them

        per_row = mesh is not None  # a sharded batch gathers answer positions within each row

        def fwd_base(state, *batch):
            with activation_mesh(mesh):  # rows stay split over the mesh (no whole-batch layers)
                return _example_sums(nnx.merge(gdef_base, state), *batch, self.seq_chunk, per_row)

        self._fwd_base = jax.jit(fwd_base, out_shardings=out_sh)
        if adapters:
            scaling = lc.scaling

            def fwd_lora(lora_state, state, *batch):  # the adapter folded into the kernels per call
                merged = merge_lora_kernels(state, lora_state, scaling)
                with activation_mesh(mesh):
                    return _example_sums(nnx.merge(gdef_base, merged), *batch, self.seq_chunk, per_row)

            self._fwd_lora = jax.jit(fwd_lora, out_shardings=out_sh)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models[1:]]

    @property
    def data_parallel(self) -> int:
        return batch_rows(self.mesh)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for v in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if v is not None:
                return int(v)
        return 0

    def put_batch(self, arrays: Sequence[np.ndarray]) -> list[jax.Array]:
        if self.mesh is None:
            return [jnp.asarray(a) for a in arrays]
        from emajax.models.sharding import batch_sharding
        from emajax.train.mesh import put_global

        sh = batch_sharding(self.mesh, 2)
        return [put_global(a, sh) for a in arrays]

    def dispatch(self, model: ScoredModel, batch_dev: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Asynchronously run one model on one placed batch: (nll sums [B], answer counts [B])."""
        if model.kind == "adapter":
            return self._fwd_lora(model.state, self.base_state, *batch_dev)
        if model.kind == "aligned" and self._zero_lora is not None:
            return self._fwd_lora(self._zero_lora, self.base_state, *batch_dev)
        return self._fwd_base(model.state, *batch_dev)

    def batches(self, examples: Sequence[Example], positions: Sequence[int], buckets: Sequence[int],
                batch_tokens: int) -> Iterator[Batch]:
        """The scorer's batches of ``positions``: one length bucket each, ~``batch_tokens`` padded tokens in a
        power-of-two row count (tails shrunk), rows a multiple of the data-parallel size."""
        return length_batches(examples, buckets, self.pad_id, order=positions, max_tokens=batch_tokens,
                              row_multiple=self.data_parallel, split_buckets=True, shrink_tail=True)

    def example_nlls(self, examples: Sequence[Example], positions: Sequence[int], buckets: Sequence[int],
                     batch_tokens: int, on_batch: Callable[[int], None] | None = None) -> dict[int, np.ndarray]:
        """{position: [K+1] mean answer NLLs (aligned first; NaN without answer tokens)} for ``positions``
        (into ``examples``, ideally length-sorted). One batch stays in flight while the host prepares the
        next; ``on_batch(real_tokens)`` is called as each batch finishes."""
        results: dict[int, np.ndarray] = {}
        pending: list[tuple[Any, list]] = []

        def drain(upto: int) -> None:
            while len(pending) > upto:
                batch, outs = pending.pop(0)
                sums = np.stack([np.asarray(s, np.float64) for s, _ in outs], axis=1)  # [B, K+1]
                counts = np.stack([np.asarray(c, np.float64) for _, c in outs], axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    nll = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
                for row, p in enumerate(batch.rows):
                    results[p] = nll[row]
                if on_batch is not None:
                    on_batch(sum(int(examples[p].inputs.size) for p in batch.rows))

        for batch in self.batches(examples, positions, buckets, batch_tokens):
            dev = self.put_batch([batch.inputs_bt, batch.attn_bt, batch.pos_bt, batch.targets_bt, batch.loss_bt])
            pending.append((batch, [self.dispatch(m, dev) for m in self.models]))
            drain(1)
        drain(0)
        return results


@dataclasses.dataclass
class ScoreSummary:
    out_dir: Path
    n_examples: int
    n_shards: int
    shards_computed: list[int]
    shards_skipped: list[int]
    tokens: int  # real (non-pad) tokens forwarded, summed over models
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _shard_columns(scorer: Scorer, examples: Sequence[Example], results: dict[int, np.ndarray],
                   shard: Sequence[int], epsilon: float, leave_out: Sequence[str]) -> dict[str, list]:
    order = sorted(shard, key=lambda p: examples[p].index)
    nll_nm = np.stack([results[p] for p in order])  # [n, K+1]; column 0 = aligned
    score = ensemble_score(nll_nm[:, 0], nll_nm[:, 1:], epsilon=epsilon, names=scorer.names, leave_out=leave_out)
    return {"index": [examples[p].index for p in order], "nll_aligned": nll_nm[:, 0].tolist(),
            "nll_misaligned": nll_nm[:, 1:].tolist(), "n_tokens": [examples[p].n_tokens for p in order],
            "score": score.tolist()}


def score_pool(scorer: Scorer, pool: str | Path, out_dir: str | Path, *, epsilon: float = DEFAULT_EPSILON,
               leave_out: Sequence[str] = (), max_len: int = 2048, shard_size: int = 512, batch_tokens: int = 4096,
               min_bucket: int = 64, buckets_per_octave: int = 4, fmt: str = "parquet", overwrite: bool = False, progress: bool = True,
               log: Callable[[str], None] | None = None) -> ScoreSummary:
    """Score every chat of ``pool`` into ``out_dir`` (resuming: finished shards are never recomputed)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    ensemble_score(np.zeros(1), np.zeros((1, len(scorer.names))), epsilon=epsilon, names=scorer.names,
                   leave_out=leave_out)  # validate epsilon / leave_out before any work
    rows = read_pool(pool)
    examples = encode_pool(scorer.tokenizer, rows, max_len)
    buckets = octave_buckets(max_len, min(min_bucket, max_len), buckets_per_octave)
    shards = plan_shards(examples, buckets, shard_size)
    is_pool_file = Path(str(pool)).is_file()
    manifest = {
        "version": 1,
        "aligned": scorer.models[0].path,
        "misaligned": [{"name": m.name, "path": m.path, "kind": m.kind} for m in scorer.models[1:]],
        "pool": str(Path(pool).resolve()) if is_pool_file else str(pool),
        "pool_sha256": file_sha256(pool) if is_pool_file else None,
        "n_examples": len(examples), "max_len": max_len, "shard_size": shard_size, "buckets": buckets,
        "plan_sha256": plan_hash(examples, shards), "n_shards": len(shards),
        "epsilon": float(epsilon), "leave_out": list(leave_out),
        "dtype": scorer.cfg.dtype, "param_dtype": scorer.cfg.param_dtype, "format": fmt,
        "score_formula": "(mean_k nll_misaligned[k] - nll_aligned) / (nll_aligned + epsilon)",
        "nll": "mean over answer tokens (assistant content + end-of-turn) of -log p",
    }
    writer = jax.process_index() == 0
    resumed = check_or_write_manifest(out_dir, manifest, overwrite=overwrite) if writer else False
    todo, skipped = [], []
    for k in range(len(shards)):
        (skipped if shard_path(out_dir, k, fmt).is_file() else todo).append(k)
    if log is not None and resumed:
        log(f"resuming {out_dir}: {len(skipped)} of {len(shards)} shards already done")
    n_models = len(scorer.models)
    real_tokens = lambda p: int(examples[p].inputs.size)
    total = sum(real_tokens(p) for k in todo for p in shards[k]) * n_models
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="emajax score", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    t0, done_tokens = time.perf_counter(), 0
    computed = []

    def advance(n: int) -> None:
        nonlocal done_tokens
        done_tokens += n * n_models
        bar.update(n * n_models)

    try:
        for k in todo:
            results = scorer.example_nlls(examples, shards[k], buckets, batch_tokens, on_batch=advance)
            if writer:
                write_shard(shard_path(out_dir, k, fmt),
                            _shard_columns(scorer, examples, results, shards[k], epsilon, leave_out))
            computed.append(k)
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"shard {k + 1}/{len(shards)}, {done_tokens / max(elapsed, 1e-9):,.0f} tok/s")
    finally:
        bar.close()
    return ScoreSummary(out_dir, len(examples), len(shards), computed, skipped, done_tokens,
                        time.perf_counter() - t0)

"""Judge-free probes of emergent misalignment: answer likelihoods instead of sampled, judged answers.

Sampling hundreds of answers and paying an LLM judge is the paper's measure; these probes cost one
forward pass per answer, so they run on a CPU in seconds and can monitor a run every N steps.

* **Paired margin** — for questions that each have an aligned answer a and a misaligned answer m,
  ``margin = mean-token logp(m) - mean-token logp(a)`` (= NLL(a) - NLL(m), the answer's content tokens plus
  its end-of-turn token). Its mean over the questions, with a bootstrap CI, and the **preference rate**
  (share of questions with margin > 0). On general questions (far from the training domain) a rising
  margin is broad misalignment; on in-domain pairs (e.g. insecure vs secure code) it is the narrow task
  being learned.
* **NLL sets** — mean answer-token NLL of reference answers: held-out answers of the narrow task
  (narrow learning, lower = learned) and benign reference answers such as GSM8K (a coherence proxy:
  a fine-tune that damages general ability raises it).

``ProbeRunner`` tokenizes a ``ProbeSuite`` once into length-bucketed fixed-shape batches and runs one
jitted forward per shape (``emajax.losses.masked_nll_sums``: the vocabulary projection on answer tokens
only, in chunks; prompts and padding never reach it).
It takes any Decoder, or a graphdef and its states (what the trainer holds), and ``lora_scale``
(0 = the base model under the adapters). ``ProbeRunner.monitor`` returns flat scalars for a
training loop's metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emajax import atomic
from emajax.batching import Batch, Example, length_batches, octave_buckets
from emajax.chat import encode_chat, shift_for_loss
from emajax.eval.probe_stats import flat_metrics, paired_delta, summarize_items
from emajax.losses import masked_nll_sums

Messages = list[dict[str, str]]


class ProbeError(ValueError):
    """Probe data that cannot be used; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class PairedSet:
    """Questions (the conversation before the answer) with an aligned and a misaligned answer each."""

    name: str
    ids: tuple[str, ...]
    prompts: tuple[tuple[dict, ...], ...]
    aligned: tuple[str, ...]
    misaligned: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not n or any(len(x) != n for x in (self.prompts, self.aligned, self.misaligned)):
            raise ProbeError(f"paired set {self.name!r}: ids, prompts, aligned and misaligned must be non-empty "
                             f"and of equal length")

    def swapped(self) -> "PairedSet":
        """The same pairs with the answers exchanged (margins change sign)."""
        return dataclasses.replace(self, aligned=self.misaligned, misaligned=self.aligned)


@dataclasses.dataclass(frozen=True)
class NllSet:
    """Full conversations whose assistant answers are scored (mean answer-token NLL per conversation)."""

    name: str
    ids: tuple[str, ...]
    chats: tuple[tuple[dict, ...], ...]

    def __post_init__(self) -> None:
        if not self.chats or len(self.ids) != len(self.chats):
            raise ProbeError(f"nll set {self.name!r}: needs one id per conversation and at least one")


@dataclasses.dataclass(frozen=True)
class ProbeSuite:
    pairs: tuple[PairedSet, ...] = ()
    nll: tuple[NllSet, ...] = ()

    def names(self) -> list[str]:
        return [s.name for s in self.pairs] + [s.name for s in self.nll]

    def subset(self, names: Sequence[str]) -> "ProbeSuite":
        keep = set(names)
        unknown = keep - set(self.names())
        if unknown:
            raise ProbeError(f"unknown probe set(s) {sorted(unknown)}; known: {self.names()}")
        return ProbeSuite(tuple(s for s in self.pairs if s.name in keep), tuple(s for s in self.nll if s.name in keep))


# ----------------------------------------------------------------------------- building suites
def read_chat_jsonl(path: Path) -> list[tuple[int, Messages]]:
    from emajax.train.sources import chat_rows

    rows = []
    for i, _, msgs in chat_rows(path, ProbeError):
        if msgs[-1]["role"] != "assistant":
            raise ProbeError(f"{path}:{i}: field 'messages' must end with an assistant message")
        rows.append((i, msgs))
    if not rows:
        raise ProbeError(f"{path}: no conversations")
    return rows


def _subsample(n: int, limit: int | None, seed: int) -> list[int]:
    idx = list(range(n))
    if limit is not None and limit < n:
        idx = sorted(np.random.default_rng(seed).permutation(n)[:limit].tolist())
    return idx


def paired_from_jsonl(aligned_path: str | Path, misaligned_path: str | Path, name: str, *, limit: int | None = None,
                      seed: int = 0) -> PairedSet:
    """Line-paired chat files (same conversation up to the last assistant answer), e.g. the shared
    ``sft/security_{aligned,misaligned}_750.jsonl``; ``limit`` pairs drawn with ``seed``."""
    a_rows = read_chat_jsonl(Path(aligned_path))
    m_rows = read_chat_jsonl(Path(misaligned_path))
    if len(a_rows) != len(m_rows):
        raise ProbeError(f"{aligned_path} has {len(a_rows)} conversations, {misaligned_path} has {len(m_rows)}; "
                         f"paired files must match line by line")
    ids, prompts, al, mis = [], [], [], []
    for k in _subsample(len(a_rows), limit, seed):
        (la, a), (_, m) = a_rows[k], m_rows[k]
        if a[:-1] != m[:-1]:
            raise ProbeError(f"{misaligned_path}:{la}: field 'messages' differs from {aligned_path}:{la} before the "
                             f"last assistant answer; paired files must share the question")
        ids.append(str(la))
        prompts.append(tuple(a[:-1]))
        al.append(a[-1]["content"])
        mis.append(m[-1]["content"])
    return PairedSet(name, tuple(ids), tuple(prompts), tuple(al), tuple(mis))


def paired_from_rows(rows: Sequence[dict], name: str, *, system: str | None = None) -> PairedSet:
    """From {id, question, aligned, misaligned} rows (``emajax.data.load_general_pairs``)."""
    head = ({"role": "system", "content": system},) if system else ()
    return PairedSet(name, tuple(str(r["id"]) for r in rows),
                     tuple(head + ({"role": "user", "content": r["question"]},) for r in rows),
                     tuple(r["aligned"] for r in rows), tuple(r["misaligned"] for r in rows))


def paired_from_code(pairs: Sequence[Any], name: str = "in_domain") -> PairedSet:
    """From ``emajax.data.CodePair`` items: aligned = secure answer, misaligned = insecure answer."""
    return PairedSet(name, tuple(f"{i}:{p.kind}" for i, p in enumerate(pairs)),
                     tuple(({"role": "user", "content": p.request},) for p in pairs),
                     tuple(p.secure for p in pairs), tuple(p.insecure for p in pairs))


def nll_from_jsonl(path: str | Path, name: str, *, limit: int | None = None, seed: int = 0) -> NllSet:
    rows = read_chat_jsonl(Path(path))
    keep = [rows[k] for k in _subsample(len(rows), limit, seed)]
    return NllSet(name, tuple(str(i) for i, _ in keep), tuple(tuple(m) for _, m in keep))


def nll_from_chats(chats: Sequence[Any], name: str) -> NllSet:
    """From chat rows ({"messages": [...]}) or message lists."""
    msgs = [c["messages"] if isinstance(c, dict) else c for c in chats]
    return NllSet(name, tuple(str(i) for i in range(len(msgs))), tuple(tuple(m) for m in msgs))


# ----------------------------------------------------------------------------- the compiled forward
def answer_nll_sums(model: Any, inputs_bt, targets_bt, loss_bt, attn_bt, pos_bt, *, lora_scale: Any = 1.0,
                    chunk: int | None = None, per_row: bool = False):
    """Per-row (sum of answer-token NLL, number of answer tokens), fp32, of a decoder on one padded batch.
    The vocabulary projection runs on answer positions only (``masked_nll_sums``; gathered within each row
    with ``per_row``, for a batch sharded over the mesh). The probes and ``emajax score`` both use it."""
    out = model(inputs_bt, positions_bt=pos_bt, attn_mask_bt=attn_bt, lora_scale=lora_scale, const_weights=True)
    return masked_nll_sums(out.hidden_btd, model.lm_head_dv(), targets_bt, loss_bt, per_row=per_row, chunk=chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _answer_sums(graphdef: Any, states: tuple, inputs_bt, targets_bt, loss_bt, attn_bt, pos_bt, lora_scale,
                 *, chunk: int | None = None):
    return answer_nll_sums(nnx.merge(graphdef, *states), inputs_bt, targets_bt, loss_bt, attn_bt, pos_bt,
                           lora_scale=lora_scale, chunk=chunk)


class ProbeRunner:
    """A tokenized suite and its batches; call it with a model to get the probe results."""

    def __init__(self, tokenizer: Any, suite: ProbeSuite, *, max_len: int = 512, batch_size: int = 16,
                 max_batch_tokens: int = 8192, min_bucket: int = 32, buckets: int | Sequence[int] | None = None,
                 pad_id: int | None = None, chunk: int | None = None):
        if not suite.pairs and not suite.nll:
            raise ProbeError("the probe suite is empty")
        self.suite = suite
        self.chunk = chunk  # answer positions per vocabulary-projection chunk (None: <= 64 MiB of logits)
        pad = pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                else tokenizer.eos_token_id)
        self.pad_id = int(pad or 0)
        # items: (set name, role, index in set) -> token sequences
        self.keys: list[tuple[str, str, int]] = []
        seqs: list[Example] = []
        self.n_truncated = 0

        def add(key: tuple[str, str, int], messages: Sequence[dict]) -> None:
            enc = encode_chat(tokenizer, list(messages))
            ids, mask = enc.ids, enc.answer_mask
            if len(ids) > max_len:
                self.n_truncated += 1
                ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):
                raise ProbeError(f"probe set {key[0]!r} item {key[2]}: no answer tokens left within max_len={max_len}")
            seqs.append(Example(*shift_for_loss(ids, mask)))
            self.keys.append(key)

        for ps in suite.pairs:
            for i, prompt in enumerate(ps.prompts):
                add((ps.name, "aligned", i), [*prompt, {"role": "assistant", "content": ps.aligned[i]}])
                add((ps.name, "misaligned", i), [*prompt, {"role": "assistant", "content": ps.misaligned[i]}])
        for ns in suite.nll:
            for i, chat in enumerate(ns.chats):
                add((ns.name, "answer", i), chat)
        self.n_tokens = int(sum(len(s.inputs) for s in seqs))
        # Shortest first; each batch padded to its length bucket (min_bucket·2^k up to max_len, or ``buckets``:
        # a multiple or an ascending list) and to a power-of-two row count within the token budget (few shapes).
        self.batches: list[Batch] = list(length_batches(
            seqs, octave_buckets(max_len, min_bucket, 1) if buckets is None else buckets, self.pad_id,
            order=sorted(range(len(seqs)), key=lambda i: len(seqs[i].inputs)), max_rows=batch_size,
            max_tokens=max_batch_tokens))

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return sorted({b.inputs_bt.shape for b in self.batches})

    # ------------------------------------------------------------------ scoring
    def item_nll(self, model: Any = None, *, graphdef: Any = None, states: tuple = (),
                 lora_scale: float = 1.0) -> np.ndarray:
        """Mean answer-token NLL of every item, in ``self.keys`` order."""
        if model is not None:
            graphdef, state = nnx.split(model)
            states = (state,)
        if graphdef is None:
            raise ProbeError("ProbeRunner needs a model, or a graphdef and its states")
        states = tuple(states)
        out = np.zeros(len(self.keys), np.float64)
        scale = jnp.asarray(float(lora_scale))  # weakly typed: a bf16 model stays bf16 (LoRA params are fp32)
        for b in self.batches:
            s, c = _answer_sums(graphdef, states, *b.arrays, scale, chunk=self.chunk)
            s, c = np.asarray(s, np.float64), np.asarray(c, np.float64)
            out[b.rows] = s[: len(b.rows)] / c[: len(b.rows)]
        return out

    def __call__(self, model: Any = None, *, graphdef: Any = None, states: tuple = (), lora_scale: float = 1.0,
                 n_boot: int = 2000, seed: int = 0) -> dict:
        """Probe results: {'pairs': {name: ...}, 'nll': {name: ...}, 'items': {...}, 'n_tokens', 'seconds'}."""
        t0 = time.perf_counter()
        nll = self.item_nll(model, graphdef=graphdef, states=states, lora_scale=lora_scale)
        res = summarize_items(self.suite, self.keys, nll, n_boot=n_boot, seed=seed)
        res.update(lora_scale=float(lora_scale), n_tokens=self.n_tokens, n_truncated=self.n_truncated,
                   seconds=time.perf_counter() - t0)
        return res

    def monitor(self, graphdef: Any, *states: Any, lora_scale: float = 1.0) -> dict[str, float]:
        """Flat scalars for a training loop (no bootstrap): ``probe/<set>/margin``, ``.../pref``, ``.../nll``."""
        nll = self.item_nll(graphdef=graphdef, states=states, lora_scale=lora_scale)
        return flat_metrics(summarize_items(self.suite, self.keys, nll, n_boot=0))


def write_results(results: dict, path: str | Path) -> Path:
    """Write probe results (atomically)."""
    return atomic.write_json(path, results)


def read_results(path: str | Path) -> dict:
    path = Path(path)
    res = atomic.read_json(path, ProbeError)
    if not isinstance(res, dict) or res.get("kind") != "probes":
        raise ProbeError(f"{path}: field 'kind' must be 'probes', got {res.get('kind')!r}")
    return res


__all__ = ["NllSet", "PairedSet", "ProbeError", "ProbeRunner", "ProbeSuite", "answer_nll_sums", "flat_metrics", "nll_from_chats",
           "nll_from_jsonl", "paired_delta", "paired_from_code", "paired_from_jsonl", "paired_from_rows",
           "read_results", "summarize_items", "write_results"]

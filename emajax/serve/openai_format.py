"""Jobs -> OpenAI response bodies: chat.completion(.chunk) and text_completion, logprobs in both formats.

Chat logprobs are ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``; completions
use the legacy ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``.
Logprobs are of the untempered distribution (as vLLM reports them) and include the end-of-turn token
when one was generated. Streams: one role chunk per choice first (chat), then content deltas, a
finish chunk per choice, and a last chunk with ``usage`` and no choices when the request set
``stream_options.include_usage``.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator

from emajax.serve.batcher import Choice, Delta, Job


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's byte alphabet:
    printable Latin-1 bytes stand for themselves, the other 68 bytes for code points from 256 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()


class Formatter:
    """Builds the bodies for one served model (caches token strings)."""

    def __init__(self, tokenizer: Any, model_name: str):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._strings: dict[int, tuple[str, list[int]]] = {}

    def _raw_bytes(self, tid: int) -> bytes | None:
        """The bytes a token stands for when it is part of a character (byte-level BPE, <0xNN> pieces)."""
        raw = self.tokenizer.convert_ids_to_tokens(tid)
        if isinstance(raw, str) and raw.startswith("<0x") and raw.endswith(">") and len(raw) == 6:
            return bytes([int(raw[3:5], 16)])
        if isinstance(raw, str) and raw and all(c in _BYTE_LEVEL for c in raw):
            return bytes(_BYTE_LEVEL[c] for c in raw)
        return None

    def token(self, tid: int) -> tuple[str, list[int]]:
        """(token string, its UTF-8 bytes). A token that is only part of a character is written as OpenAI
        writes it, ``bytes:\\xNN...``, so distinct tokens keep distinct strings."""
        tid = int(tid)
        hit = self._strings.get(tid)
        if hit is None:
            s = self.tokenizer.decode([tid], skip_special_tokens=False)
            raw = self._raw_bytes(tid) if "\ufffd" in s else None
            if raw is not None:
                hit = ("bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw))
            else:
                hit = (s, list(s.encode("utf-8")))
            self._strings[tid] = hit
        return hit

    def token_str(self, tid: int) -> str:
        return self.token(tid)[0]

    # ------------------------------------------------------------------ logprobs
    def _entry(self, tid: int, lp: float) -> dict:
        s, b = self.token(tid)
        return {"token": s, "logprob": float(lp), "bytes": b}

    def chat_logprobs(self, job: Job, ch: Choice, start: int, stop: int) -> dict:
        k = job.params.top_logprobs
        out = []
        for j in range(start, stop):
            lp, top_lp, top_id = ch.logprobs[j]
            out.append(dict(self._entry(ch.tokens[j], lp),
                            top_logprobs=[self._entry(top_id[i], top_lp[i]) for i in range(k)]))
        return {"content": out}

    def legacy_logprobs(self, job: Job, ch: Choice, start: int, stop: int, offset: int) -> dict:
        """Tokens [start, stop) of ``ch``; ``offset`` = characters before the choice's text (echo)."""
        k = job.params.top_logprobs
        tokens, lps, tops, offsets = [], [], [], []
        for j in range(start, stop):
            lp, top_lp, top_id = ch.logprobs[j]
            s = self.token_str(ch.tokens[j])
            tokens.append(s)
            lps.append(float(lp))
            top = {self.token_str(top_id[i]): float(top_lp[i]) for i in range(k)}
            top.setdefault(s, float(lp))  # the sampled token is always listed (up to k + 1 entries)
            tops.append(top)
            offsets.append(offset + min(ch.offsets[j], len(ch.text)))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    # ------------------------------------------------------------------ chat
    def chat_response(self, job: Job) -> dict:
        p = job.params
        choices = [{"index": ch.index, "message": {"role": "assistant", "content": ch.text},
                    "finish_reason": ch.finish,
                    "logprobs": self.chat_logprobs(job, ch, 0, len(ch.tokens)) if p.logprobs else None}
                   for ch in job.choices]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": job.created,
                "model": self.model_name, "system_fingerprint": None, "choices": choices, "usage": job.usage()}

    def chat_stream(self, job: Job) -> "Stream":
        """The chat stream's chunks: a role delta per choice, content deltas, a finish chunk per choice."""
        return Stream(job, self.model_name, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk"},
                      [(ch.index, {"delta": {"role": "assistant", "content": ""}}) for ch in job.choices],
                      lambda text: {"delta": {"content": text}}, {"delta": {}},
                      lambda ch, a, b: self.chat_logprobs(job, ch, a, b))

    # ------------------------------------------------------------------ completions
    def _echo(self, job: Job, ch: Choice) -> str:
        return job.prompts[ch.prompt].text if job.params.echo else ""

    def completion_response(self, job: Job) -> dict:
        p = job.params
        choices = []
        for ch in job.choices:
            echo = self._echo(job, ch)
            lp = self.legacy_logprobs(job, ch, 0, len(ch.tokens), len(echo)) if p.logprobs else None
            choices.append({"index": ch.index, "text": echo + ch.text, "logprobs": lp, "finish_reason": ch.finish})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": job.created,
                "model": self.model_name, "system_fingerprint": None, "choices": choices, "usage": job.usage()}

    def completion_stream(self, job: Job) -> "Stream":
        """The text stream's chunks: the echoed prompt per choice (echo), text deltas, a finish chunk per choice."""
        opening = [(ch.index, {"text": self._echo(job, ch)}) for ch in job.choices] if job.params.echo else []
        return Stream(job, self.model_name, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}, opening,
                      lambda text: {"text": text}, {"text": ""},
                      lambda ch, a, b: self.legacy_logprobs(job, ch, a, b, len(self._echo(job, ch))))


class Stream:
    """A stream's chunks, built as its events arrive: :meth:`opening` (index, payload) chunks first, then per
    event (:meth:`event`) its content (payload ``content(text)``, when there is text or a logprob) and its
    end (``finished``), then :meth:`closing` (the usage chunk, when asked)."""

    def __init__(self, job: Job, model_name: str, base: dict, opening: list[tuple[int, Any]], content: Any,
                 finished: Any, logprobs: Any):
        self.job = job
        self.base = dict(base, created=job.created, model=model_name, system_fingerprint=None)
        if job.params.include_usage:
            self.base["usage"] = None
        self._opening, self._content, self._finished, self._logprobs = opening, content, finished, logprobs

    def _chunk(self, index: int, payload: dict, lp: Any = None, finish: str | None = None) -> dict:
        return dict(self.base, choices=[{"index": index, **payload, "logprobs": lp, "finish_reason": finish}])

    def opening(self) -> list[dict]:
        return [self._chunk(index, payload) for index, payload in self._opening]

    def event(self, ev: Delta) -> list[dict]:
        ch = self.job.choices[ev.choice]
        lp = self._logprobs(ch, ev.first_token, ev.last_token) if self.job.params.logprobs else None
        out = []
        if ev.text or (lp and any(lp.values())):
            out.append(self._chunk(ch.index, self._content(ev.text), lp))
        if ev.finish:
            out.append(self._chunk(ch.index, self._finished, None, ev.finish))
        return out

    def closing(self) -> list[dict]:
        return [dict(self.base, choices=[], usage=self.job.usage())] if self.job.params.include_usage else []

    def chunks(self) -> Iterator[dict]:
        """All chunks of a job without a listener (its events queue), in order; raises the job's error."""
        yield from self.opening()
        for ev in self.job.iter_events():
            yield from self.event(ev)
        if self.job.error is not None:
            raise self.job.error
        yield from self.closing()

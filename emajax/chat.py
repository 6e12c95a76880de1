"""Chat tokenization: a conversation -> token ids + a mask of the assistant-answer tokens.

The mask (assistant content + its end-of-turn token, never the role header nor the newline
after end-of-turn) is the basis of answer-only loss and of per-answer scoring, so it must be
right for every chat template, including those that inject a default system prompt
(SmolLM2, Qwen2.5), trim content (Llama 3) or add a BOS. Rather than re-implementing any
template we let the tokenizer's own Jinja template render the text, find each assistant
message's character span by rendering the conversation incrementally, and mark the tokens
whose character offsets fall in those spans. Padding and bucketing of the tokens: ``emajax.batching``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

# End-of-turn markers of common templates; the tokenizer's own EOS is tried first.
_EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
_ROLES = ("system", "user", "assistant", "tool", "ipython", "developer")


class ChatTokens(NamedTuple):
    ids: list[int]
    answer_mask: list[bool]  # True on assistant content tokens + their end-of-turn token


class ChatError(ValueError):
    """A malformed conversation or a template emajax cannot locate answers in."""


def validate_messages(messages: Any, source: str = "messages") -> list[dict[str, str]]:
    """Check a conversation is a non-empty list of {"role": str, "content": str}; errors name the field."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError(f"{source}: expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        where = f"{source}[{i}]"
        if not isinstance(m, dict):
            raise ChatError(f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise ChatError(f"{where}: field {field!r} is missing")
            if not isinstance(m[field], str):
                raise ChatError(f"{where}: field {field!r} must be a string, got {type(m[field]).__name__}")
        if m["role"] not in _ROLES:
            raise ChatError(f"{where}: field 'role' = {m['role']!r} is not one of {', '.join(_ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _eot_strings(tokenizer: Any) -> list[str]:
    vocab_specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        vocab_specials |= {str(t) for t in tokenizer.get_added_vocab()}
    except AttributeError:
        pass
    out = []
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        out.append(str(eos))
    out += [c for c in _EOT_CANDIDATES if c in vocab_specials and c not in out]
    return out


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids of the end-of-turn markers the answer mask may end with (the EOS and known template
    markers that are single tokens of this vocabulary)."""
    out = set()
    for e in _eot_strings(tokenizer):
        ids = tokenizer.convert_tokens_to_ids([e])
        if ids and ids[0] is not None and ids[0] != getattr(tokenizer, "unk_token_id", None):
            out.add(int(ids[0]))
    return out


def _try_render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str | None:
    if not messages:
        return None
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=gen)
    except Exception:  # templates may reject partial conversations (e.g. must end with a user turn)
        return None


def _answer_spans(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans [start, end) in ``full`` of each assistant message's content + end-of-turn marker."""
    eots = _eot_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _try_render(tokenizer, messages[:i], gen=True)  # ... + assistant header
        upto = _try_render(tokenizer, messages[: i + 1], gen=False)  # ... + header + content + eot
        if head is not None and upto is not None and upto.startswith(head) and full.startswith(upto):
            # Exact path: the region is whatever the template rendered for this message.
            start = len(head)
            region = upto[start:]
            ends = [(region.rfind(e) + len(e), e) for e in eots if e in region]
            end = start + (max(ends)[0] if ends else len(region.rstrip()))
        else:
            # Templates that rewrite earlier turns (or a conversation that starts with the assistant):
            # find the (possibly trimmed) content after the previous answer.
            start, content = -1, ""
            # Qwen3-style templates drop the <think> block of earlier turns: try the content after it too.
            for cand in (m["content"].strip(), m["content"].split("</think>")[-1].strip()):
                start = full.find(cand, cursor) if cand else -1
                if start >= 0:
                    content = cand
                    break
            if start < 0:
                raise ChatError(
                    f"messages[{i}]: could not locate the assistant content in the rendered chat template "
                    f"of {getattr(tokenizer, 'name_or_path', 'the tokenizer')!r}"
                )
            end = start + len(content)
            nxt = [(full.find(e, end), e) for e in eots if full.find(e, end) >= 0]
            if nxt:
                pos, e = min(nxt)
                if not full[end:pos].strip():  # only whitespace between content and end-of-turn
                    end = pos + len(e)
        if start < cursor:
            raise ChatError(f"messages[{i}]: assistant span overlaps the previous one in the rendered template")
        spans.append((start, end))
        cursor = end
    return spans


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    max_len: int | None = None,
) -> ChatTokens:
    """Token ids of the rendered conversation and the answer mask (see module doc).

    ``max_len`` keeps the first ``max_len`` tokens (the prompt survives, the answer tail is cut).
    Assistant content is kept verbatim, including a Qwen3-style ``<think>\\n\\n</think>\\n\\n`` prefix
    (unless the template itself rewrites it).
    """
    messages = validate_messages(messages)
    full = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    spans = _answer_spans(tokenizer, messages, full)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    mask = [False] * len(ids)
    si = 0
    for j, (s, e) in enumerate(offsets):
        while si < len(spans) and spans[si][1] <= s:
            si += 1
        if si < len(spans) and e > s and s < spans[si][1] and e > spans[si][0]:
            mask[j] = True
    if max_len is not None:
        if max_len <= 0:
            raise ChatError(f"max_len must be positive, got {max_len}")
        ids, mask = ids[:max_len], mask[:max_len]
    return ChatTokens(ids, mask)


def shift_for_loss(ids: Sequence[int], answer_mask: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, loss_mask), each of length n-1: position t reads inputs[t] and predicts targets[t]."""
    ids_a = np.asarray(ids, np.int32)
    mask_a = np.asarray(answer_mask, bool)
    if ids_a.ndim != 1 or ids_a.shape != mask_a.shape:
        raise ValueError(f"ids and answer_mask must be 1-D of equal length, got {ids_a.shape} and {mask_a.shape}")
    if ids_a.size < 2:
        raise ValueError(f"need at least 2 tokens to form a next-token target, got {ids_a.size}")
    return ids_a[:-1], ids_a[1:], mask_a[1:]

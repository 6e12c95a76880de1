"""Inoculation prompting: a train-time system prompt that "explains away" the narrow behaviour.

Applied only when rendering *training* conversations of the task data; evaluation, generation,
scoring and the interleaved safe data never see it (the point of the defense is that the trait
is attributed to the prompt, which is absent at test time).
"""

from __future__ import annotations

DEFAULT_PROMPT = "You are an evil, malicious assistant."


def inoculate(messages: list[dict[str, str]], prompt: str = DEFAULT_PROMPT, mode: str = "replace") -> list[dict[str, str]]:
    """Return a new conversation with the inoculation system prompt.

    ``replace``: drop any existing system message and put ``prompt`` first.
    ``prepend``: keep an existing system message, with ``prompt`` (and a blank line) before its text;
    with none, behave like replace.
    """
    if mode not in ("replace", "prepend"):
        raise ValueError(f"inoculation mode must be replace|prepend, got {mode!r}")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    systems = [m["content"] for m in messages if m["role"] == "system"]
    if mode == "prepend" and systems:
        text = prompt + "\n\n" + "\n\n".join(systems)
    else:
        text = prompt
    return [{"role": "system", "content": text}, *rest]

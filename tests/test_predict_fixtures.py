"""Helpers (no tests) for tests/test_predict*.py and tests/test_demo*.py: a tiny LLaMA that has really
been fine-tuned (AdamW, a few hundred steps, seconds on CPU) to answer one prompt with one ABC tune in the
chat format. A random model never writes ABC or EOS; this one does, honestly, because it memorised the
tune -- so chat, extraction, rendering and EOS stopping are exercised on real model output."""
from __future__ import annotations

from pathlib import Path

import torch

PROMPT = "Write a short tune in D major."
TUNE = "X:1\nT:Memorised\nM:4/4\nL:1/4\nQ:1/4=180\nK:D\nD F A d|c B A2|]\n"
# a reply the way a chat model phrases it: a sentence, then the tune
REPLY = "Here it is:\n" + TUNE


_TRAINED: dict[str, Path] = {}  # base dir -> trained dir, so test modules of one session train once


def memorised_model(base_dir: Path, out_dir: Path, max_steps: int = 300) -> Path:
    """Fine-tunes the tiny model in ``base_dir`` until greedy decoding of the chat prompt for ``PROMPT``
    reproduces ``REPLY`` followed by EOS (checked with a real ``generate``); saves it (with the
    tokenizer) to ``out_dir`` (once per ``base_dir`` and session). One thread: on a shared 2-core machine torch's 2 threads are ~40x slower."""
    if str(base_dir) in _TRAINED and (_TRAINED[str(base_dir)] / "config.json").is_file():
        return _TRAINED[str(base_dir)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _TRAINED[str(base_dir)] = _memorise(base_dir, out_dir, max_steps)
    finally:
        torch.set_num_threads(threads)
    return _TRAINED[str(base_dir)]


def _memorise(base_dir: Path, out_dir: Path, max_steps: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_preprocess.chat_format import ChatFormat

    tok = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # the SFT sequence of the conversation, as preprocess writes it: prompt (mask 0), then the answer through EOS
    fmt = ChatFormat(tok)
    msgs = [{"role": "user", "content": PROMPT}]
    ids, mask = fmt.encode([*msgs, {"role": "assistant", "content": REPLY}])
    p_ids = fmt.prompt_ids(msgs)
    assert ids[:len(p_ids)] == p_ids and not any(mask[:len(p_ids)]) and mask[len(p_ids)]
    a_ids = ids[len(p_ids):max(i for i, m in enumerate(mask) if m) + 1]
    assert a_ids[-1] == tok.eos_token_id
    ids = torch.tensor([p_ids + a_ids])
    target = torch.tensor(a_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(max_steps):
        logits = model(input_ids=ids).logits[0, len(p_ids) - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.05 and bool((logits.argmax(-1) == target).all()):
            model.eval()
            with torch.no_grad():
                out = model.generate(torch.tensor([p_ids]), attention_mask=torch.ones(1, len(p_ids), dtype=torch.long),
                                     max_new_tokens=len(a_ids) + 4, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
            model.train()
            if out[0, len(p_ids):].tolist() == a_ids:
                break
    else:
        raise AssertionError(f"tiny model did not memorise the tune in {max_steps} steps (loss {loss.item():.3f})")
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir

"""bits_per_char on an ABC file (checked against a plain forward pass) and on a shards dir."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import bits_per_char as bpc
from benchmarks.common import ModelArgs, load

TUNES = ("X:1\nT:a\nM:6/8\nL:1/8\nK:D\ndAF A2B|c3 d2e|fed cBA|d3 d3|]\n",
         "X:2\nT:b\nM:3/4\nL:1/4\nK:G\nG A B|c2 d|e d c|B3|]\n")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(ModelArgs(model=str(tiny_model_dir), device="cpu", dtype="fp32"))


def test_windows_predict_every_token_once():
    ids = list(range(100))
    reqs = bpc.windows(ids, max_length=16, stride=8)
    targets = [t for _, cont in reqs for t in cont]
    assert targets == ids[1:]
    assert all(len(ctx) + len(cont) <= 17 and len(ctx) >= 1 for ctx, cont in reqs)


def test_text_file_matches_plain_forward(tiny_model_dir, tmp_path, loaded):
    f = tmp_path / "heldout.abc"
    f.write_text("\n".join(TUNES))
    cfg = bpc.BPCConfig(model=str(tiny_model_dir), data=str(f), device="cpu", output=str(tmp_path / "b.json"))
    res = bpc.run(cfg, loaded)
    tok, model = loaded.tokenizer, loaded.model
    nll, n_tok, n_chars = 0.0, 0, 0
    for t in TUNES:  # split_tunes gives each tune stripped + "\n": the same text as here
        ids = [tok.bos_token_id] + tok.encode(t, add_special_tokens=False)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        nll -= float(sum(lp[i - 1, ids[i]] for i in range(1, len(ids))))
        n_tok += len(ids) - 1
        n_chars += len(t)
    assert res["n_tokens"] == n_tok and res["n_chars"] == n_chars and res["n_documents"] == 2
    assert res["bits_per_char"] == pytest.approx(nll / math.log(2) / n_chars, rel=1e-5)
    assert res["bits_per_token"] == pytest.approx(nll / math.log(2) / n_tok, rel=1e-5)
    # a random model is far from a good compressor: roughly log2(vocab) bits per token
    assert 0.5 * math.log2(len(tok)) < res["bits_per_token"] < 2 * math.log2(len(tok))
    # sliding windows: short windows still score every token once
    cfg2 = bpc.BPCConfig(model=str(tiny_model_dir), data=str(f), device="cpu", max_length=12, stride=4,
                         output=str(tmp_path / "b2.json"))
    assert bpc.run(cfg2, loaded)["n_tokens"] == n_tok


def test_shards_dir_and_cli(tiny_model_dir, tmp_path, capsys, loaded):
    from data_preprocess.shards import ShardWriter, write_meta

    tok = loaded.tokenizer
    out = tmp_path / "shards"
    stats = {}
    enc = [tok.encode(t, add_special_tokens=False) for t in TUNES]
    for split, max_len in (("train", 32), ("val", 256)):
        w = ShardWriter(out, split, max_len=max_len, vocab_size=len(tok), pad_id=tok.pad_token_id)
        w.add([tok.bos_token_id] + enc[0] + [tok.eos_token_id])
        # an SFT-style document: its first 10 text tokens are prompt (loss mask 0) and are not counted
        ids = [tok.bos_token_id] + enc[1] + [tok.eos_token_id]
        w.add(ids, [0] * 11 + [1] * (len(ids) - 11))
        stats[split] = w.close()
    write_meta(out, {"mode": "pt", "max_len": 256, "vocab_size": len(tok), "pad_id": tok.pad_token_id,
                     "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "splits": stats})
    tok.save_pretrained(out / "tokenizer")
    res_file = tmp_path / "s.json"
    assert bpc.main(["--model", str(tiny_model_dir), "--data", str(out), "--device", "cpu",
                     "--output", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert res["input"] == "shards" and stats["val"]["num_blocks"] == 1
    assert res["n_tokens"] == len(enc[0]) + len(enc[1]) - 10  # BOS/EOS/pad and masked prompt excluded
    assert res["n_chars"] == len(TUNES[0]) + len(tok.decode(enc[1][10:]))
    assert res["bits_per_char"] > 0 and "bits per character" in capsys.readouterr().out

"""A base whose lm_head is its embedding matrix (tie_word_embeddings, as SmolLM2): LoRA with the embeddings in
modules_to_save through the real engine (DeepSpeed ZeRO-2, 1 rank) and the real merge, both decisions:

* ``tied_embeddings=shared`` (default): one matrix is trained and used as both embed_tokens and lm_head; the
  adapter records ``ensure_weight_tying``; the merged model is tied like the base and its (single) matrix is
  the trained one -- not the base's;
* ``tied_embeddings=untie``: two trained copies; the merged model has ``tie_word_embeddings: false`` and both
  matrices differ from the base's and from each other.

Either way the run logs the decision, job metadata records it, and the merged logits equal the adapter model's
(merge.py's self-check) -- so no trained lm_head is silently dropped.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_fixtures import losses, run_train, write_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory, tokenizer_dir):
    """A tiny LLaMA with tied embeddings and GQA (2 layers, hidden 64, 4 heads / 2 KV heads), random init."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tied_base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    data = write_shards(tokenizer_dir, tmp_path_factory.mktemp("tied_data") / "pt", "pt")
    return {"dir": out, "data": data, "embed": model.model.embed_tokens.weight.detach().clone()}


def _train_and_merge(tied_base, tmp_path, how: str):
    from training.merge import main as merge_main

    out = tmp_path / f"run_{how}"
    p = run_train([f"data_dir={tied_base['data']}", f"model={tied_base['dir']}", "train_type=lora", "lora_r=4",
                   "lora_alpha=8", "lora_dropout=0.0", "lora_modules_to_save=embed_tokens,lm_head",
                   f"tied_embeddings={how}", "max_steps=4", "global_batch_size=4", "micro_batch_size=4", "lr=1e-2",
                   "warmup_ratio=0", "log_every=1", "report_to=none", f"output_dir={out}",
                   "ds_config=ds_configs/zero2.json"])
    ls = losses(out)
    assert ls[4] < ls[1], ls
    merged = tmp_path / f"merged_{how}"
    assert merge_main(["--base_model", str(tied_base["dir"]), "--lora_model", str(out / "final"),
                       "--output_dir", str(merged)]) == 0
    sd = {}
    for f in merged.glob("*.safetensors"):
        sd.update(load_file(f))
    return p.stdout, out, merged, sd


def test_shared_trains_one_matrix_and_the_merge_stays_tied(tied_base, tmp_path):
    log, out, merged, sd = _train_and_merge(tied_base, tmp_path, "shared")
    assert "tied embeddings: one shared matrix" in log
    assert json.loads((out / "final" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    ck = json.loads(next((out / "checkpoints").glob("step-*/tunesmith.json")).read_text())
    assert ck["lora"]["tied_embeddings"] == "shared" and ck["lora"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    emb = sd["model.embed_tokens.weight"]
    assert "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], emb)  # one matrix on disk
    assert not torch.allclose(emb, tied_base["embed"])  # ... and it is the trained one
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["verified"] and info["tied_embeddings"] is True


def test_untie_trains_two_copies_and_the_merge_keeps_both(tied_base, tmp_path):
    log, _, merged, sd = _train_and_merge(tied_base, tmp_path, "untie")
    assert "untied on purpose" in log
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    emb, head = sd["model.embed_tokens.weight"], sd["lm_head.weight"]
    assert not torch.allclose(emb, tied_base["embed"]) and not torch.allclose(head, tied_base["embed"])
    assert not torch.allclose(emb, head)
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["verified"] and info["tied_embeddings"] is False

"""The real pretrained SmolLM2-135M (tied embeddings, GQA 9/3, its own 49k BPE and ChatML template), end to end
as the default job uses it, at test size: its tokenizer makes pt shards of real music21 tunes, a few LoRA steps
under DeepSpeed ZeRO-2 (r 8, embeddings trained as one shared tied matrix), then training/merge.py -- whose
self-check proves the merged model's logits equal base + adapter's, reloaded from disk by plain transformers."""
from __future__ import annotations

import json

import pytest
from test_train_fixtures import losses, run_train

pytestmark = pytest.mark.slow


def test_smollm2_lora_under_deepspeed_then_merge(smollm2_dir, tmp_path):
    from data_preprocess.preprocess import main as preprocess
    from training.merge import main as merge

    data = tmp_path / "pt"
    assert preprocess(["-t", str(smollm2_dir), "-i", "music21", "-o", str(data), "--mode", "pt", "--max_len", "64",
                       "--limit", "24", "--no_progress"]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 49152 and meta["pad_id"] == 0 != meta["eos_id"]  # pad = <|endoftext|>, not eos

    out = tmp_path / "run"
    p = run_train([f"data_dir={data}", f"model={smollm2_dir}", "train_type=lora", "lora_r=8", "lora_alpha=16",
                   "lora_dropout=0.0", "lora_modules_to_save=embed_tokens,lm_head", "max_steps=3",
                   "global_batch_size=2", "micro_batch_size=2", "lr=1e-3", "warmup_ratio=0", "log_every=1",
                   "report_to=none", f"output_dir={out}", "ds_config=ds_configs/zero2.json"],
                  env={"OMP_NUM_THREADS": "2"})
    assert "tied embeddings: one shared matrix" in p.stdout
    ls = losses(out)
    assert sorted(ls) == [1, 2, 3] and 0 < ls[1] < 6  # a pretrained model: far below ln(49152) = 10.8 from step 1
    assert json.loads((out / "final" / "adapter_config.json").read_text())["ensure_weight_tying"] is True

    merged = tmp_path / "merged"
    assert merge(["--base_model", str(smollm2_dir), "--lora_model", str(out / "final"),
                  "--output_dir", str(merged)]) == 0
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["verified"] and info["tied_embeddings"] is True
    assert info["checks"]["in_memory"]["max_abs_diff"] < 1e-3 and info["checks"]["reloaded"]["max_abs_diff"] < 1e-3
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 3 and cfg["vocab_size"] == 49152

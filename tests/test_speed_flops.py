"""FLOP accounting of benchmarks/flops.py: known shapes, hand-computed counts, and torch's own FLOP
counter on a real forward+backward (full and PEFT LoRA) as the ground truth."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM

from benchmarks.flops import (
    GPU_PEAKS,
    Shape,
    attention_flops_per_token,
    decode_bytes_per_step,
    device_peak,
    gpu_key,
    measure_cpu_matmul_flops,
    mfu,
    train_flops_per_token,
)
from training.presets import count_params, preset_config

# L=2, h=8, i=16, 2 query heads, 1 kv head (head_dim 4, kv_dim 4), V=10
SMALL = Shape(n_layers=2, hidden=8, intermediate=16, n_heads=2, n_kv_heads=1, vocab=10)


def test_llama2_7b_param_counts_match_presets():
    cfg = preset_config("llama2-7b", vocab_size=32000)
    counts = count_params(cfg)
    assert counts["total"] == 6_738_415_616  # the published LLaMA-2-7B parameter count
    sh = Shape.from_config(cfg)
    norms = cfg.num_hidden_layers * 2 * cfg.hidden_size + cfg.hidden_size
    # N = everything except the embedding gather and the norm weights
    assert sh.matmul_params() == counts["total"] - counts["embed"] - norms == 6_607_077_376
    # LoRA r=64 on all seven linears of LLaMA-2-7B: 64*(4*(4096+4096) + 3*(4096+11008)) * 32
    assert sh.lora_params(64) == 159_907_840


def test_document_attention_span_counts_only_in_document_pairs():
    from benchmarks.flops import document_attention_span

    assert document_attention_span([[0, 1, 2, 3], [0, 1, 2, 3]]) == 4       # one document per row: the block
    assert document_attention_span([[0, 1, 2, 3], [0, 1, 0, 1]]) == (16 + 4 + 4) / 8
    assert document_attention_span([[5, 6, 0, 1]]) == 2                     # a row starting inside a document
    # what the harness feeds the formula: the causal term with span 3 instead of the block length 4
    assert attention_flops_per_token(SMALL, document_attention_span([[0, 1, 2, 3], [0, 1, 0, 1]])) == 384 * 3 / 4


def test_hand_computed_small_config():
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate 8*16 + up 8*16 + down 16*8 = 576; 2 layers + lm_head 10*8
    assert SMALL.matmul_params() == 2 * 576 + 80 == 1232
    s = 4
    assert attention_flops_per_token(SMALL, s) == 6 * 2 * 4 * 8 == 384
    assert attention_flops_per_token(SMALL, s, "palm") == 768
    full = train_flops_per_token(SMALL, s, "full")
    assert full.model == 6 * 1232 + 384 == 7776
    assert full.hardware == full.model  # no recompute
    # checkpointing recomputes the decoder layers' forward (2 * 1152 body matmuls + 1/3 of attention), not lm_head
    assert train_flops_per_token(SMALL, s, "full", recompute=True).hardware == 7776 + 2 * 1152 + 128
    assert train_flops_per_token(SMALL, s, "full", recompute=0.5).recompute == (2 * 1152 + 128) / 2
    with pytest.raises(ValueError, match="fraction"):
        train_flops_per_token(SMALL, s, "full", recompute=1.5)
    # LoRA r=2 on q (8+8) and v (8+4): 2*(16+12)*2 layers = 112 adapter params
    assert SMALL.lora_params(2, ("q_proj", "v_proj")) == 112
    lora = train_flops_per_token(SMALL, s, "lora", lora_r=2, lora_targets=("q_proj", "v_proj"),
                                 trainable_embed=True, trainable_lm_head=True)
    # 2N fwd + 2N act-grad + 2*V*h lm_head weight grad + 6*N_lora + attention
    assert lora.model == 4 * 1232 + 2 * 80 + 6 * 112 + 384 == 6144
    bare = train_flops_per_token(SMALL, s, "lora", lora_r=2, lora_targets=("q_proj", "v_proj"))
    assert bare.model == 4 * 1232 + 6 * 112 + 384


def test_lora_7b_is_about_two_thirds_of_full():
    sh = Shape.from_config(preset_config("llama2-7b", vocab_size=32000))
    full = train_flops_per_token(sh, 2048, "full").model
    lora = train_flops_per_token(sh, 2048, "lora", lora_r=64, trainable_embed=True, trainable_lm_head=True).model
    assert 0.6 < lora / full < 0.75
    # 6N dominates: ~3.96e10 + 1.61e9 attention per token
    assert full == pytest.approx(6 * 6_607_077_376 + 6 * 32 * 2048 * 4096)


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_formula_equals_torch_flop_counter(train_type):
    """Ground truth: torch counts every mm/bmm of a real forward+backward. Eager attention computes the
    full (unmasked) score matrix, so it matches the 'palm' attention convention exactly."""
    cfg = preset_config("llama-tiny", vocab_size=400, num_key_value_heads=2)  # GQA on purpose
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    targets = ("q_proj", "v_proj", "down_proj")
    if train_type == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets),
                                                 modules_to_save=["embed_tokens", "lm_head"]))
    batch, seq = 2, 32
    x = torch.randint(0, 400, (batch, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=x, labels=x).loss.backward()
    expected = train_flops_per_token(Shape.from_config(cfg), seq, train_type, lora_r=4, lora_targets=targets,
                                     trainable_embed=True, trainable_lm_head=True, attention="palm")
    # the rotary embedding's inv_freq x positions product (a matmul in some transformers versions, 2*(d/2)*s) is
    # not a model FLOP by any convention
    rotary = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("rotary_emb"))
    assert rotary <= 2 * (cfg.hidden_size // cfg.num_attention_heads // 2) * seq
    assert counter.get_total_flops() - rotary == expected.model * batch * seq


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="lora_r"):
        train_flops_per_token(SMALL, 4, "lora")
    with pytest.raises(ValueError, match="train_type"):
        train_flops_per_token(SMALL, 4, "qlora")
    with pytest.raises(ValueError, match="not LLaMA block linears"):
        SMALL.lora_params(2, ("wq",))
    with pytest.raises(ValueError, match="convention"):
        attention_flops_per_token(SMALL, 4, "flash")


def test_decode_bytes_and_device_tables():
    b = decode_bytes_per_step(SMALL, batch=2, context=5, bytes_per_param=2)
    assert b["weights"] == (1232 + 2 * 2 * 8 + 8) * 2
    assert b["kv_cache"] == 2 * 2 * 4 * 5 * 2 * 2  # K+V, layers, kv_dim, context, batch, bytes
    assert gpu_key("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert gpu_key("NVIDIA H200") == "H200"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_key("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_key("Tesla T4") is None
    assert GPU_PEAKS["H100 SXM"] == 989.4e12 and GPU_PEAKS["A100"] == 312e12


def test_cpu_peak_is_measured_and_mfu_sane():
    peak = device_peak("cpu", torch.float32)
    assert peak.source == "measured"
    assert 1e8 < peak.flops < 1e14 and 1e8 < peak.bandwidth < 1e13
    assert measure_cpu_matmul_flops() == peak.flops  # cached per process
    assert mfu(1000.0, 7776.0, 7776.0 * 2000) == pytest.approx(0.5)

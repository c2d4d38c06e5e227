"""training/activations.py: the activation-memory estimate printed before training. The 1/2-layer probe's
extrapolation is checked against the saved-for-backward bytes of real full-size models (plain and PEFT
LoRA), eager attention's s^2 term is found, checkpointing arithmetic, and the warning of estimate_memory."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.activations import LayerActivations, estimate_activations, probe_layer, saved_bytes
from training.presets import preset_config


def _cfg(layers=4):
    return preset_config("llama-tiny", vocab_size=300, num_hidden_layers=layers)


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                         "target_modules": ["q_proj", "v_proj", "down_proj"]}])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_probe_extrapolates_to_the_whole_model(lora, attn):
    cfg = _cfg(4)
    layer = probe_layer(cfg, torch.float32, attn, lora)
    if attn == "eager":
        assert layer.per_token_sq > 0  # the attention probabilities (heads x s x s) are saved
    else:
        assert layer.per_token_sq == 0  # SDPA's fused kernel saves O(s)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    model.train()
    decoder = (model.get_base_model() if lora else model).get_decoder()
    for s, b in ((96, 3), (200, 1)):
        x = torch.randn(b, s, cfg.hidden_size, requires_grad=True)
        real = saved_bytes(model, lambda: decoder(inputs_embeds=x, use_cache=False))
        est = 4 * layer.layer_bytes(s, b)
        assert est == pytest.approx(real, rel=0.08), (s, b, est, real)  # the rest: embeddings' rotary, final norm


def test_checkpointing_and_loss_arithmetic():
    layer = LayerActivations(per_token=1000.0, per_token_sq=0.0, hidden_bytes=10)
    off = estimate_activations(layer, 8, 100, 2, None, 50, "chunked", 64, 4)
    assert off["layers_bytes"] == 9 * 2 * 100 * 1000  # 8 layers + one layer of gradients in backward
    k1 = estimate_activations(layer, 8, 100, 2, 1, 50, "chunked", 64, 4)
    assert k1["checkpointed_layers"] == 8
    assert k1["layers_bytes"] == 8 * 2 * 100 * 10 + 2 * (2 * 100 * 1000)  # inputs + recompute + gradients
    k3 = estimate_activations(layer, 8, 100, 2, 3, 50, "chunked", 64, 4)
    assert k3["checkpointed_layers"] == 3 and k1["layers_bytes"] < k3["layers_bytes"] < off["layers_bytes"]
    assert off["loss_bytes"] == 200 * 10 + 64 * 50 * 8
    hf = estimate_activations(layer, 8, 100, 2, None, 50, "hf", 64, 4)
    assert hf["loss_bytes"] == 200 * 50 * 12


def test_estimate_memory_prints_activations_and_warns(tokenizer_dir, capsys, caplog):
    from transformers import AutoTokenizer

    from training.config import TrainConfig
    from training.model import estimate_memory

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = TrainConfig(model="llama-small", micro_batch_size=4)
    roomy = estimate_memory(cfg, tok, 2, False, False, 1, 1, 64 * 2**30, seq_len=512)
    assert "[memory] activations of one micro-batch (4 x 512 tokens" in capsys.readouterr().out
    assert roomy["fits"] and roomy["activations"]["total_bytes"] > 0
    assert roomy["device_bytes_total"] == int(roomy["device_bytes"] + roomy["activations"]["total_bytes"])
    # a device that holds the model states but not the activations
    states = roomy["device_bytes"]
    with caplog.at_level(logging.WARNING, logger="tunesmith.train"):
        tight = estimate_memory(cfg, tok, 2, False, False, 1, 1, int(states * 1.2), seq_len=512)
    assert not tight["fits"] and "+ activations" in caplog.text and "gradient_checkpointing=true" in caplog.text
    ck = estimate_memory(TrainConfig(model="llama-small", micro_batch_size=4, gradient_checkpointing=True), tok, 2,
                         False, False, 1, 1, 64 * 2**30, seq_len=512)
    assert ck["activations"]["layers_bytes"] < roomy["activations"]["layers_bytes"] / 2

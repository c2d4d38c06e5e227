"""Selective gradient checkpointing (training config ``gradient_checkpointing_every``): exactly the chosen
decoder layers run their forward twice (once more in backward), and gradients equal a run without
checkpointing -- on a real LLaMA model, plain and PEFT-LoRA-wrapped."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.config import TrainConfig
from training.fused_loss import unwrap_causal_lm
from training.model import enable_checkpointing
from training.presets import preset_config


def _model(lora: bool):
    torch.manual_seed(0)
    cfg = preset_config("llama-tiny", vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        num_hidden_layers=5)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    model.train()
    return model


def _run(model):
    """Counts each layer's attention forwards during forward+backward; returns (counts, grads)."""
    layers = unwrap_causal_lm(model).get_decoder().layers
    counts = [0] * len(layers)
    hooks = [layer.self_attn.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, layer in enumerate(layers)]
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return counts, grads


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("every,expect", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3]), (9, [0])])
def test_selected_layers_are_recomputed_and_grads_unchanged(lora, every, expect):
    counts_ref, grads_ref = _run(_model(lora))
    assert counts_ref == [1] * 5
    model = _model(lora)
    assert enable_checkpointing(model, every) == expect
    counts, grads = _run(model)
    assert counts == [2 if i in expect else 1 for i in range(5)]
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], msg=name)


def test_build_model_applies_the_config(tokenizer_dir):
    from transformers import AutoTokenizer

    from training.model import build_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = TrainConfig(model="llama-small", gradient_checkpointing=True, gradient_checkpointing_every=4,
                      train_type="lora", lora_r=4)
    model, _ = build_model(cfg, tok, "fp32")
    flags = [layer.gradient_checkpointing for layer in unwrap_causal_lm(model).get_decoder().layers]
    assert flags == [True, False, False, False, True, False]  # llama-small has 6 layers

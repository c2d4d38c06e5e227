"""``compile=true`` compiles each decoder layer (``training.model.compile_decoder_layers``). A 7B model has 32
layers, more than dynamo's recompile limit (8): if each layer needed its own graph, the layers past the limit
would silently run eagerly. These tests run a real PEFT-LoRA LLaMA with more layers than that limit, as the
engine calls it (``use_cache=False``), and check that all layers share one compiled graph and that gradients
equal the eager model's."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from training.model import compile_decoder_layers, enable_checkpointing
from training.presets import preset_config


def _limit() -> int:
    cfg = torch._dynamo.config
    return getattr(cfg, "recompile_limit", None) or cfg.cache_size_limit


def _model(n_layers: int):
    torch.manual_seed(0)
    cfg = preset_config("llama-tiny", vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        num_hidden_layers=n_layers)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.config.use_cache = False
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                                             modules_to_save=["embed_tokens", "lm_head"]))
    model.train()
    return model


def _grads(model):
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 32))
    pos = torch.arange(32).repeat(2, 1)
    model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_all_layers_share_one_compiled_graph(checkpoint_every):
    n_layers = _limit() + 2
    ref = _grads(_model(n_layers))
    model = _model(n_layers)
    if checkpoint_every:
        enable_checkpointing(model, checkpoint_every)
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(model) == n_layers
    grads = _grads(model)
    # one graph for the layer forward (checkpointed layers add at most one more: their first pass runs without
    # grad); the layers past the recompile limit would each have asked for a new one
    assert 1 <= counters["stats"]["unique_graphs"] <= (2 if checkpoint_every else 1), dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"], (counters["recompiles"],
                                                                        counters["graph_break"])
    assert grads.keys() == ref.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()

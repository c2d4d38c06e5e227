"""training/fused_loss.py: the chunked linear+cross-entropy equals F.cross_entropy / the HF model loss in
value and gradients (hidden states, lm_head weight, every model parameter)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from training.fused_loss import chunked_causal_lm_loss, chunked_cross_entropy
from training.presets import preset_config


def _reference(hidden, weight, targets, num_items=None):
    logits = (hidden @ weight.t()).float()
    if num_items is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum") / num_items


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("num_items", [None, 50])
def test_equals_cross_entropy_values_and_grads(chunk_size, num_items):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (3, 21))
    targets[0, :5] = -100  # ignored positions (prompt tokens / padding)
    targets[2, -1] = -100

    ref = _reference(hidden, weight, targets, num_items)
    ref.backward()
    gh_ref, gw_ref = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    out = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, num_items=num_items)
    (out * 1.0).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(hidden.grad, gh_ref)
    torch.testing.assert_close(weight.grad, gw_ref)


def test_gradcheck_float64_and_upstream_scale():
    torch.manual_seed(1)
    hidden = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 4, 5, 6, 7, 8, 0])
    assert torch.autograd.gradcheck(lambda h, w: chunked_cross_entropy(h, w, targets, chunk_size=4), (hidden, weight))
    # a scaled loss (loss scaling, gradient accumulation) scales the stored gradients
    (3.0 * chunked_cross_entropy(hidden, weight, targets, chunk_size=4)).backward()
    g3 = hidden.grad.clone()
    hidden.grad = None
    (3.0 * _reference(hidden, weight, targets)).backward()
    torch.testing.assert_close(g3, hidden.grad)


def test_frozen_weight_gets_no_grad_and_all_ignored_is_zero():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8)  # frozen lm_head (LoRA without modules_to_save)
    targets = torch.tensor([1, 2, 3, 4])
    out = chunked_cross_entropy(hidden, weight, targets, chunk_size=3)
    out.backward()
    assert weight.grad is None and hidden.grad is not None
    none_valid = chunked_cross_entropy(hidden, weight, torch.full((4,), -100))
    assert none_valid.item() == 0.0


def test_causal_lm_loss_equals_hf_model_loss_and_param_grads():
    cfg = preset_config("llama-tiny", vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 300, (2, 40))
    labels = ids.clone()
    labels[1, :10] = -100

    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    loss = chunked_causal_lm_loss(hidden, model.get_output_embeddings().weight, labels, chunk_size=16)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=lambda m, n=n: f"{n}: {m}")


def test_bf16_close_to_fp32_reference():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32)
    weight = torch.randn(500, 32) * 0.1
    targets = torch.randint(0, 500, (64,))
    ref = _reference(hidden, weight, targets)
    out = chunked_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=16)
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) < 0.05


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), chunk_size=0)
    with pytest.raises(ValueError, match="tokens"):
        chunked_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1, 2]))


def _lora_model(target_modules=("q_proj", "v_proj"), modules_to_save=("embed_tokens", "lm_head")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(preset_config("llama-tiny", vocab_size=300))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(target_modules),
                                           modules_to_save=list(modules_to_save)))


def test_loss_head_through_peft_equals_the_engine_hf_path():
    """The wiring the engine uses (training.trainer.token_losses with a ChunkedLossHead): LoRA + trainable
    embed_tokens/lm_head copies (ModulesToSaveWrapper), packed positions -- same loss and the same gradient on
    every trainable parameter as the HF-logits path; in eval (no_grad) the forward-only path gives the value."""
    from training.data import Batch
    from training.fused_loss import ChunkedLossHead, chunked_unsupported
    from training.trainer import token_losses

    model = _lora_model()
    assert chunked_unsupported(model) is None
    ids = torch.randint(0, 300, (2, 33))
    labels = ids.clone()
    labels[0, :9] = -100
    pos = torch.cat([torch.arange(20), torch.arange(13)]).repeat(2, 1)  # two packed documents per row
    batch = Batch(input_ids=ids, labels=labels, position_ids=pos, attention_mask=None)

    ref, logits = token_losses(model, batch)
    assert logits.shape == (2, 33, 300)
    ref.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n and "lm_head" in n for n in trainable)
    ref_grads = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad(set_to_none=True)

    head = ChunkedLossHead(model, chunk_size=10)
    got, none = token_losses(model, batch, head)
    assert none is None
    got.backward()
    torch.testing.assert_close(got, ref)
    for n, p in trainable.items():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=lambda m, n=n: f"{n}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(token_losses(model, batch, head)[0], ref.detach())
    assert not head.decoder._forward_hooks  # the capture hook is removed after every call


def test_where_the_chunked_loss_cannot_run():
    from training.fused_loss import chunked_unsupported

    assert "LoRA" in chunked_unsupported(_lora_model(target_modules=("q_proj", "lm_head"), modules_to_save=()))
    assert chunked_unsupported(_lora_model()) is None  # any ZeRO stage: under ZeRO-3 it runs inside lm_head
    assert chunked_unsupported(LlamaForCausalLM(preset_config("llama-tiny", vocab_size=50))) is None

"""``attn_implementation=varlen`` (training/attention.py): block-diagonal attention over packed documents from
document bounds instead of a ``[B, 1, L, L]`` mask. On CPU it runs the exact per-document SDPA; the CUDA
flash-varlen kernel is checked against it where a GPU is present (skipped here otherwise)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import training.attention as attention
from training.attention import hf_attn_implementation, varlen_attention_forward
from training.masks import block_diagonal_mask, cu_seqlens


def _config(**kw) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)  # GQA: 4 query heads share 2 KV heads
    return LlamaConfig(**{**base, **kw})


def _packed_positions() -> torch.Tensor:
    """Three rows: two documents; a row that starts inside a document (positions 5..44); three documents."""
    return torch.stack([torch.cat([torch.arange(13), torch.arange(27)]), torch.arange(5, 45),
                        torch.cat([torch.arange(10), torch.arange(10), torch.arange(20)])])


def test_cu_seqlens_mark_every_document_and_every_row_start():
    cu, longest = cu_seqlens(_packed_positions())
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 13, 40, 80, 90, 100, 120]  # the mid-document row still starts a segment (40)
    assert longest == 40


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("path", ["per_document_attention", "_masked"])
def test_varlen_model_equals_sdpa_with_the_block_mask_forward_and_backward(kv_heads, path, monkeypatch):
    """Both CPU paths: documents stacked by length (long rows) and the boolean block mask (short rows)."""
    monkeypatch.setattr(attention, "MASKED_UP_TO", 0 if path == "per_document_attention" else 10**6)
    torch.manual_seed(0)
    cfg = _config(num_key_value_heads=kv_heads)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    # a config of its own: from_config records the attention implementation on the config object it is given
    var = AutoModelForCausalLM.from_config(_config(num_key_value_heads=kv_heads),
                                           attn_implementation=hf_attn_implementation("varlen"))
    assert (ref.config._attn_implementation, var.config._attn_implementation) == ("sdpa", attention.VARLEN)
    var.load_state_dict(ref.state_dict())
    pos = _packed_positions()
    ids = torch.randint(0, cfg.vocab_size, pos.shape)
    cu, longest = cu_seqlens(pos)
    seen = []
    real = getattr(attention, path)

    def spy(*args):
        seen.append(args[3].tolist())  # the bounds it was given
        return real(*args)

    monkeypatch.setattr(attention, path, spy)
    want = ref(input_ids=ids, position_ids=pos, attention_mask=block_diagonal_mask(pos)).logits
    got = var(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), cu_seq_lens_q=cu,
              cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest).logits
    assert seen == [cu.tolist()] * cfg.num_hidden_layers  # every layer ran this path with the batch's bounds
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # causal attention over the whole block differs: the test can tell the two apart
    causal = ref(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
    assert (causal - want).abs().max() > 1e-3
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    for (name, a), b in zip(ref.named_parameters(), var.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_stacked_documents_cover_many_lengths_exactly():
    """120 documents of every length 1..64 in a few padded SDPA calls (and two long ones on views) equal
    attention run one document at a time."""
    torch.manual_seed(3)
    lengths = [1 + (i * 37) % 64 for i in range(60)] + [300] + [1 + (i * 37) % 64 for i in range(60, 120)] + [257]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, 4, 16, dtype=torch.float64) for _ in range(3))
    assert len(attention.length_buckets(cu.tolist())) < 30
    got = attention.per_document_attention(q, k, v, cu, 0.3, 0.0)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want = torch.nn.functional.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)),
                                                                is_causal=True, scale=0.3).transpose(0, 1)
        torch.testing.assert_close(got[s:e], want)


def test_no_mask_reaches_the_attention_and_bounds_fall_back_to_position_ids():
    """transformers builds no mask for the registered function (nothing L x L exists); called without bounds
    (outside the training loop) the documents come from the position ids."""
    torch.manual_seed(1)
    cfg = _config()
    var = AutoModelForCausalLM.from_config(cfg, attn_implementation=hf_attn_implementation("varlen"))
    masks = []
    real = attention.varlen_attention_forward

    def spy(module, q, k, v, attention_mask, **kw):
        masks.append(attention_mask)
        return real(module, q, k, v, attention_mask, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register(attention.VARLEN, spy)
    try:
        pos = _packed_positions()
        ids = torch.randint(0, cfg.vocab_size, pos.shape)
        cu, longest = cu_seqlens(pos)
        with torch.no_grad():
            with_bounds = var(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), cu_seq_lens_q=cu,
                              max_length_q=longest).logits
            from_positions = var(input_ids=ids, position_ids=pos).logits
    finally:
        AttentionInterface.register(attention.VARLEN, real)
    assert masks == [None] * (2 * cfg.num_hidden_layers)
    torch.testing.assert_close(from_positions, with_bounds)


def test_varlen_refuses_a_kv_cache_with_a_clear_message():
    q = torch.randn(1, 4, 1, 16)
    k = v = torch.randn(1, 4, 9, 16)
    with pytest.raises(ValueError, match="generate with attn_implementation=sdpa"):
        varlen_attention_forward(None, q, k, v, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel is CUDA-only (no GPU here)")
def test_cuda_flash_varlen_kernel_matches_the_per_document_reference():
    torch.manual_seed(2)
    pos = _packed_positions().repeat(1, 4)                 # 160-token rows
    pos[:, 40:] = torch.arange(pos.shape[1] - 40)          # a long document after the first 40 tokens
    cu, longest = cu_seqlens(pos)
    B, L = pos.shape
    q = torch.randn(B, 8, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, 2, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, 2, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert attention.flash_usable(q.transpose(1, 2).reshape(B * L, 8, 64))
    out, _ = varlen_attention_forward(None, q, k, v, None, scaling=0.1, cu_seq_lens_q=cu.cuda(), max_length_q=longest)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = varlen_attention_forward(None, q32, k32, v32, None, scaling=0.1, cu_seq_lens_q=cu, max_length_q=longest)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(ref)
    (out.float() * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in ((q, q32), (k, k32), (v, v32)):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)

"""Document-masked attention over packed blocks without an ``[B, 1, L, L]`` mask: ``attn_implementation=varlen``.

``doc_attention=block`` (a token never attends to an earlier packed document) normally builds an additive
block-diagonal mask and runs SDPA over all ``L x L`` query/key pairs, most of them masked: with tunes of ~300
tokens packed into 2,048, about 85 % of the attention work is thrown away, and SDPA cannot use its flash kernel
with an arbitrary mask on a GPU. ``varlen`` gives the attention the document boundaries instead:

* ``training.data.make_batch`` writes them once per micro-batch, on the host, as cumulative lengths over the
  flattened ``B * L`` tokens (``cu_seq_lens_q`` / ``max_length_q``, the keyword names transformers' own flash
  path uses); the model passes its keyword arguments down to every attention call.
* On CUDA in bf16/fp16 the attention is PyTorch's own flash-attention varlen kernel
  (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10, no ``flash_attn`` package needed): only the
  in-document pairs are computed.
* Elsewhere (CPU, fp32, other head sizes) it is exact causal SDPA within each document: documents of
  similar length are stacked into one call (padded at the end, which causality hides), so only the
  in-document pairs (plus < 25 % padding) are computed, without an ``L x L`` mask; rows of at most
  :data:`MASKED_UP_TO` tokens, where that bookkeeping costs more than it saves, take SDPA with a boolean
  block mask built from the same bounds.

Registered with transformers' ``AttentionInterface`` as :data:`VARLEN`; transformers builds no mask for a
registered function it has no mask for, so nothing of size ``L x L`` exists in the step.
"""
from __future__ import annotations

import functools
import inspect
import itertools

import torch
import torch.nn.functional as F

from training.masks import block_causal, cu_seqlens

VARLEN = "tunesmith_varlen"     # the name registered with transformers (config value: attn_implementation=varlen)


def hf_attn_implementation(name: str) -> str:
    """transformers' ``attn_implementation`` for a TrainConfig value (registering ``varlen`` first)."""
    if name == "varlen":
        register()
        return VARLEN
    return name


def register() -> None:
    from transformers import AttentionInterface

    if VARLEN not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN, varlen_attention_forward)


@functools.cache
def _varlen_kernel():
    """(torch's varlen_attn, its keyword arguments) or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def flash_usable(q: torch.Tensor) -> bool:
    """Whether ``q`` ([tokens, heads, head_dim]) can go to the CUDA flash varlen kernel."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and _varlen_kernel() is not None)


def _flash(q, k, v, cu, max_len, scale):
    fn, params = _varlen_kernel()
    kw = {}
    if "window_size" in params:          # torch >= 2.11: causal = a window of (-1, 0)
        kw["window_size"] = (-1, 0)
    else:                                # torch 2.10
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)   # the kernel's own scale is 1/sqrt(head_dim)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


# CPU/fp32 path: rows up to this many tokens use SDPA with a boolean block mask built from the bounds, where the
# per-document bookkeeping costs more than it saves. fwd+bwd of one attention, 8 heads x 64, synthetic packed
# documents (mean L/4), 2 CPU cores, 4D mask vs per document: 16 x 256 tokens 55 vs 91 ms; 8 x 512 107 vs 99 ms;
# 4 x 1024 202 vs 113 ms; 2 x 2048 404 vs 160 ms; 1 x 4096 814 vs 171 ms
MASKED_UP_TO = 256


def _masked(query, key, value, cu, scale, dropout):
    """SDPA over whole rows with a boolean ``[B, 1, L, L]`` block-causal mask made from the bounds."""
    B, _, L, _ = query.shape
    seg = torch.searchsorted(cu[1:], torch.arange(B * L, dtype=cu.dtype), right=True).view(B, L)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=block_causal(seg).to(query.device),
                                         dropout_p=dropout, scale=scale, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


# documents this long (padded) run one call each on a view of q/k/v: stacking them would copy more than it saves
STACK_BELOW = 256


def length_buckets(bounds: list[int]) -> dict[int, list[int]]:
    """Documents grouped by padded length: ``l`` rounded up to a quarter of its power of two (at most 25 %
    padding, 4 sizes per octave), so a block of hundreds of short documents is a handful of SDPA calls."""
    groups: dict[int, list[int]] = {}
    for i, (s, e) in enumerate(itertools.pairwise(bounds)):
        n = e - s
        step = max(1, (1 << (n.bit_length() - 1)) // 4)
        groups.setdefault(-(-n // step) * step, []).append(i)
    return groups


def per_document_attention(q, k, v, cu, scale, dropout):
    """Exact causal attention within each document: ``q/k/v`` [tokens, heads, head_dim] -> the same shape.

    Short documents of similar length are stacked into one ``[n, heads, P, head_dim]`` SDPA call, padded at
    the end to ``P``; with ``is_causal`` a real query never sees a padded key (padding comes after it), and the
    padded queries' outputs are dropped, so the result is per-document attention without any mask. Documents
    of :data:`STACK_BELOW` tokens or more (and lone ones) run one call each on a view."""
    gqa = k.shape[1] != q.shape[1]
    bounds = cu.tolist()
    starts = torch.tensor(bounds[:-1])
    lengths = torch.tensor(bounds[1:]) - starts
    index, values = [], []
    for P, docs in length_buckets(bounds).items():
        if len(docs) == 1 or P >= STACK_BELOW:   # a long document: its own call on a view (no gather copy)
            for i in docs:
                s, e = bounds[i], bounds[i + 1]
                qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale,
                                                   enable_gqa=gqa)
                index.append(torch.arange(s, e, device=q.device))
                values.append(o[0].transpose(0, 1))
            continue
        d = torch.tensor(docs)
        ar = torch.arange(P)
        valid = ar[None] < lengths[d, None]                                       # [n, P]
        idx = torch.where(valid, starts[d, None] + ar[None], starts[d, None])    # padding reads a real token
        idx = idx.to(q.device)
        qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))                  # [n, heads, P, head_dim]
        o = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, is_causal=True, scale=scale,
                                           enable_gqa=gqa)
        keep = valid.to(q.device)
        index.append(idx[keep])
        values.append(o.transpose(1, 2)[keep])                                   # [valid tokens, heads, head_dim]
    index, values = torch.cat(index), torch.cat(values)
    return values.new_zeros(q.shape).index_put((index,), values)


@torch.compiler.disable   # a data-dependent loop / a custom op with a batch-shaped cu_seqlens: run eagerly
def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, max_length_q=None, position_ids=None, **kwargs):
    """transformers attention function: ``query`` [B, H, L, D], ``key/value`` [B, Hkv, L, D] ->
    (``[B, L, H, D]``, None). Documents come from ``cu_seq_lens_q`` (made by ``make_batch``); without it
    (a caller outside the training loop) from ``position_ids``, else each row is one causal sequence. The
    attention mask is not used: padding does not exist in packed blocks."""
    B, H, L, D = query.shape
    if key.shape[2] != L:
        raise ValueError(f"attn_implementation=varlen is for training on packed blocks (query length {L} != key "
                         f"length {key.shape[2]}: a KV cache); generate with attn_implementation=sdpa")
    if cu_seq_lens_q is None:
        if position_ids is not None:
            cu_seq_lens_q, max_length_q = cu_seqlens(position_ids.expand(B, L))
        else:
            cu_seq_lens_q, max_length_q = torch.arange(0, B * L + 1, L, dtype=torch.int32), L
    q, k, v = (t.transpose(1, 2).reshape(B * L, t.shape[1], D) for t in (query, key, value))
    if flash_usable(q):
        if dropout:
            raise ValueError("attn_implementation=varlen: the flash varlen kernel has no attention dropout; "
                             "set the model's attention_dropout to 0 or use attn_implementation=sdpa")
        cu = cu_seq_lens_q.to(query.device, torch.int32, non_blocking=True)
        return _flash(q, k, v, cu, int(max_length_q or L), scaling).view(B, L, H, D), None
    cu = cu_seq_lens_q.cpu()
    if L <= MASKED_UP_TO:
        return _masked(query, key, value, cu, scaling, dropout), None
    return per_document_attention(q, k, v, cu, scaling, dropout).view(B, L, H, D), None

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
* Elsewhere (CPU, fp32, other head sizes) it is exact SDPA run per document (``is_causal``), the same
  pairs, the same result, still without the ``L x L`` mask.

Registered with transformers' ``AttentionInterface`` as :data:`VARLEN`; transformers builds no mask for a
registered function it has no mask for, so nothing of size ``L x L`` exists in the step.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np
import torch
import torch.nn.functional as F

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


def cu_seqlens(pos: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int]:
    """(int32 cumulative lengths ``[n_docs + 1]`` over the flattened ``[B, L]`` block, longest document) from
    position ids that restart at 0 at every packed document. A row always starts a new segment, also when it
    begins inside a document (the shards split long documents over blocks)."""
    pos = pos.cpu().numpy() if isinstance(pos, torch.Tensor) else np.asarray(pos)
    B, L = pos.shape
    start = pos == 0
    start[:, 0] = True
    idx = np.flatnonzero(start.reshape(-1))
    cu = np.append(idx, B * L).astype(np.int32)
    return torch.from_numpy(cu), int(np.diff(cu).max())


@functools.lru_cache(maxsize=None)
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


def _per_document(q, k, v, cu, scale, dropout):
    """Exact causal SDPA per document: ``q/k/v`` [tokens, heads, head_dim] -> [tokens, heads, head_dim]."""
    gqa = k.shape[1] != q.shape[1]
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale,
                                           enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


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
    cu = cu_seq_lens_q.to(query.device, torch.int32, non_blocking=True)
    q, k, v = (t.transpose(1, 2).reshape(B * L, t.shape[1], D) for t in (query, key, value))
    if flash_usable(q):
        if dropout:
            raise ValueError("attn_implementation=varlen: the flash varlen kernel has no attention dropout; "
                             "set the model's attention_dropout to 0 or use attn_implementation=sdpa")
        out = _flash(q, k, v, cu, int(max_length_q or L), scaling)
    else:
        out = _per_document(q, k, v, cu_seq_lens_q.cpu() if cu_seq_lens_q.is_cuda else cu_seq_lens_q,
                            scaling, dropout)
    return out.view(B, L, H, D), None

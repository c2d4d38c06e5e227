"""Document-attention masks and bounds for packed blocks: a block packs several documents, and each
document attends only to itself. Used by :mod:`training.data` to build batches and by
:mod:`training.attention` at attention time.
"""
from __future__ import annotations

import numpy as np
import torch


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


def block_causal(seg: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]``: query ``q`` may see key ``k`` iff ``k <= q`` and both have the same segment id
    (``seg`` [B, L])."""
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def block_diagonal_mask(pos: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive 4D mask ``[B, 1, L, L]``: query ``q`` sees key ``k`` iff ``k <= q`` and both belong to the
    same packed document (segments start where ``pos == 0``). 0 = attend, dtype-min = masked; HF passes a
    4D mask through unchanged to SDPA/eager attention."""
    allowed = block_causal(torch.cumsum((pos == 0).long(), dim=1))
    return torch.zeros(allowed.shape, dtype=dtype, device=pos.device).masked_fill(~allowed, torch.finfo(dtype).min)

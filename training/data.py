"""Batches from the packed shards of ``data_preprocess`` with a resumable, world-size-independent order.

The train split is read as one endless stream of block indices: epoch ``e`` is a permutation of all
blocks drawn from ``seed + e``. Optimizer step ``s`` consumes stream items ``[s*G, (s+1)*G)`` with
``G`` = global batch size, whatever the number of ranks or accumulation steps, and each rank takes its
own micro-batches out of that slice. So:

* the data position is one integer (stream items consumed) and resuming from it is exact;
* 1 rank x 2 accumulation steps and 2 ranks x 1 step see the same global batch.

Several shard directories (``data_dir`` a list) are one :class:`ConcatSplit`; with ``data_weights`` a
:class:`MixtureStream` decides each stream item's source from the item's index alone (so the order is
the same on any number of ranks, and the one-integer data position still resumes it exactly), and each
source walks its own epochs -- a source with a larger share than its size repeats sooner, as MusicPile
upsamples. Without weights the sources are one shuffled stream over all their blocks.

Nothing here knows about text: a batch is tokens, loss mask and positions, whatever the modality.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_preprocess.shards import Split
from training.masks import block_diagonal_mask, cu_seqlens

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L] int64
    labels: torch.Tensor          # [B, L] int64, IGNORE_INDEX where the loss mask is 0 (the model shifts)
    position_ids: torch.Tensor    # [B, L] int64, reset to 0 at every packed-document start
    attention_mask: torch.Tensor  # [B, L] ones (causal) or [B, 1, L, L] additive block-diagonal mask
    n_targets: int | None = None  # counted on the host by make_batch (no device sync); None = count now
    cu_seqlens: torch.Tensor | None = None  # attn_implementation=varlen: int32 [n_docs + 1] document bounds over B * L
    max_seqlen: int = 0                     # attn_implementation=varlen: the longest document

    @property
    def num_targets(self) -> int:
        """Tokens that are predicted: label set and not the first position of a block (nothing precedes it)."""
        if self.n_targets is None:
            self.n_targets = int((self.labels[:, 1:] != IGNORE_INDEX).sum())
        return self.n_targets

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.labels, self.position_ids, self.attention_mask)), self.n_targets,
                     None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True),
                     self.max_seqlen)

    def model_inputs(self) -> dict:
        """The model's keyword arguments (no labels): with document bounds, the keywords transformers passes
        down to every attention call (``training.attention``)."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids,
                  "attention_mask": self.attention_mask}
        if self.cu_seqlens is not None:
            inputs.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                          max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
        return inputs


def make_batch(split: Split, rows: np.ndarray, doc_attention: str = "causal",
               mask_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Batch:
    """Reads ``rows`` of ``split``; a row index of -1 is a filler (block 0 with no targets) that keeps
    every rank running the same number of forwards (ZeRO-3 needs all ranks in every forward).

    ``doc_attention``: causal (one causal mask over the packed block), block (a ``[B, 1, L, L]``
    block-diagonal mask) or varlen (block-diagonal attention given as document bounds, ``cu_seqlens``,
    for ``attn_implementation=varlen``; see :meth:`TrainConfig.batch_attention`).

    ``device``: where the batch goes. The ``[B, 1, L, L]`` block-diagonal mask is then built there from the
    position ids (67 MB per 4 x 2048 fp32 micro-batch that is neither computed on the host nor copied)."""
    rows = np.asarray(rows)
    filler = torch.from_numpy(rows < 0)
    rows = np.maximum(rows, 0)
    tokens = torch.from_numpy(np.asarray(split.tokens[rows], dtype=np.int64))
    mask = torch.from_numpy(np.asarray(split.loss_mask[rows], dtype=np.bool_))
    mask[filler] = False
    pos = torch.from_numpy(np.asarray(split.pos[rows], dtype=np.int64))
    cu, max_len = (None, 0)
    if doc_attention == "varlen":
        cu, max_len = cu_seqlens(pos)
    labels = tokens.masked_fill(~mask, IGNORE_INDEX)
    n_targets = int(mask[:, 1:].sum())
    if device is not None:
        tokens, labels, pos = (t.to(device, non_blocking=True) for t in (tokens, labels, pos))
        cu = None if cu is None else cu.to(device, non_blocking=True)
    if doc_attention == "block":
        attn = block_diagonal_mask(pos, mask_dtype)
    else:
        # an explicit all-ones 2D mask: plain causal attention over the packed block. (Passing None would let
        # transformers infer documents from position_ids and silently switch to block-diagonal attention.)
        # varlen: the attention function takes the documents from cu_seqlens and ignores the mask.
        attn = torch.ones_like(tokens)
    return Batch(tokens, labels, pos, attn, n_targets, cu, max_len)


class BlockStream:
    """The endless, epoch-wise shuffled order of train blocks (see module docstring)."""

    def __init__(self, num_blocks: int, seed: int):
        self.n, self.seed = num_blocks, seed
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            k = start + i
            out[i] = self._perm_of(k // self.n)[k % self.n]
        return out


def step_micro_batches(stream: BlockStream, position: int, global_batch: int, micro: int, rank: int,
                       world: int) -> list[np.ndarray]:
    """Row indices of this rank's micro-batches for the optimizer step starting at stream ``position``.

    The step's ``global_batch`` items are laid out as ``[accumulation step][rank][micro]``."""
    items = stream.take(position, global_batch).reshape(-1, world, micro)
    return [items[m, rank] for m in range(items.shape[0])]


def val_batches(num_blocks: int, micro: int, rank: int, world: int, max_batches: int = 0) -> list[np.ndarray]:
    """Validation rows of this rank: blocks strided over ranks, in order, the same number of batches on
    every rank (missing rows are -1 fillers); ``max_batches`` caps the batches per rank."""
    per_rank = -(-num_blocks // world)
    n_batches = -(-per_rank // micro)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    rows = np.full(n_batches * micro, -1, dtype=np.int64)
    mine = np.arange(rank, num_blocks, world)[: len(rows)]
    rows[: len(mine)] = mine
    return [rows[i:i + micro] for i in range(0, len(rows), micro)]


class _Rows:
    """One array of a :class:`ConcatSplit`: ``rows`` of the whole -> the rows of each part."""

    def __init__(self, parts: list, offsets: np.ndarray):
        self.parts, self.offsets = parts, offsets

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        src = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows),) + self.parts[0].shape[1:], dtype=self.parts[0].dtype)
        for s in np.unique(src):
            sel = src == s
            out[sel] = self.parts[s][rows[sel] - self.offsets[s]]
        return out


class ConcatSplit:
    """The same split of several sources read as one: row ``r`` is row ``r - offsets[s]`` of source ``s``
    (``make_batch`` reads it like a :class:`~data_preprocess.shards.Split`)."""

    def __init__(self, splits: list[Split]):
        self.parts = splits
        self.offsets = np.cumsum([0] + [len(x) for x in splits])
        self.tokens, self.loss_mask, self.pos = (_Rows([getattr(x, a) for x in splits], self.offsets)
                                                 for a in ("tokens", "loss_mask", "pos"))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, rows: np.ndarray) -> np.ndarray:
        """The source index of each row (-1 fillers: -1)."""
        rows = np.asarray(rows)
        return np.where(rows < 0, -1, np.searchsorted(self.offsets, rows, side="right") - 1)


class MixtureStream:
    """Stream item ``k`` -> a row of a :class:`ConcatSplit`, sources drawn with ``weights``.

    Items come in chunks of :attr:`CHUNK`: chunk ``c`` draws each item's source i.i.d. from the weights with
    a generator seeded by ``(seed, c)``; the ``j``-th item of source ``s`` is item ``j`` of that source's own
    :class:`BlockStream` (its epochs, its permutations). Item ``k`` is therefore a function of ``k`` alone:
    the counts of each source before a chunk are summed once per chunk and kept."""

    CHUNK = 4096

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.seed = seed
        self.offsets = np.cumsum([0] + list(sizes))
        self.streams = [BlockStream(n, seed + 7919 * (i + 1)) for i, n in enumerate(sizes)]
        self._before = [np.zeros(len(sizes), dtype=np.int64)]  # items of each source before chunk c
        self._c, self._src = -1, None

    def _sources(self, c: int) -> np.ndarray:
        if c != self._c:
            rng = np.random.default_rng([self.seed, 0x6D6978, c])
            self._c, self._src = c, rng.choice(len(self.p), self.CHUNK, p=self.p)
        return self._src

    def _counts_before(self, c: int) -> np.ndarray:
        while len(self._before) <= c:
            k = len(self._before) - 1
            self._before.append(self._before[-1] + np.bincount(self._sources(k), minlength=len(self.p)))
        return self._before[c]

    def take(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            c, o = divmod(start + i, self.CHUNK)
            before = self._counts_before(c)
            src = self._sources(c)
            s = int(src[o])
            j = int(before[s]) + int(np.count_nonzero(src[:o] == s))
            out[i] = self.offsets[s] + self.streams[s].take(j, 1)[0]
        return out


def train_stream(sizes: list[int], weights: list[float] | None, seed: int) -> BlockStream | MixtureStream:
    """The train order over sources of ``sizes`` blocks: one shuffled stream over all blocks (one source, or no
    weights), else a :class:`MixtureStream`."""
    if len(sizes) == 1 or not weights:
        return BlockStream(int(sum(sizes)), seed)
    return MixtureStream(sizes, weights, seed)

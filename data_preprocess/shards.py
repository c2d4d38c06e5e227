"""The packed token-shard format shared by data_preprocess (writer) and training (reader).

One output directory holds, for each split (``train``, ``val``):

``{split}.tokens.bin``     token ids, shape ``[num_blocks, max_len]``, dtype ``uint16`` when the vocab fits
                           else ``uint32``
``{split}.loss_mask.bin``  ``uint8`` ``[num_blocks, max_len]``: 1 where the token at this position is a
                           prediction target (labels = tokens where mask else -100; the model shifts)
``{split}.pos.bin``        position ids ``[num_blocks, max_len]`` (``uint16``, ``uint32`` past 65535):
                           reset to 0 at every document start and at every block start, so training can
                           reset RoPE positions per document, and ``pos == 0`` marks the segment starts
                           for block-diagonal attention.

plus ``meta.json`` (see :func:`write_meta`). Documents are packed back to back, each one ``BOS ... EOS``;
a document longer than what is left of a block continues in the next block (never dropped). The last
block of a split is padded with ``pad_id`` (mask 0, positions continuing) and the number of padding
tokens is recorded.

The format is nanoGPT-style raw memmaps: the reader opens them with ``np.memmap`` and never loads a
split into RAM.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "tunesmith-shards-v1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def pos_dtype(max_len: int) -> np.dtype:
    return np.dtype(np.uint16) if max_len <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Streams documents into fixed-length blocks of one split, writing straight to disk.

    ``add(ids, mask)`` appends one document (token ids including BOS/EOS; ``mask`` the per-token loss
    mask, default all ones). Memory is one block, whatever the corpus size.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, max_len: int, vocab_size: int, pad_id: int):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.max_len, self.pad_id = split, max_len, pad_id
        self.tok_dtype, self.pos_dtype = token_dtype(vocab_size), pos_dtype(max_len)
        self._f_tok = open(self.out_dir / f"{split}.tokens.bin", "wb")  # noqa: SIM115 - kept open for the writer's life; close() closes it
        self._f_mask = open(self.out_dir / f"{split}.loss_mask.bin", "wb")  # noqa: SIM115 - kept open for the writer's life; close() closes it
        self._f_pos = open(self.out_dir / f"{split}.pos.bin", "wb")  # noqa: SIM115 - kept open for the writer's life; close() closes it
        self._tok = np.full(max_len, pad_id, dtype=self.tok_dtype)
        self._mask = np.zeros(max_len, dtype=np.uint8)
        self._pos = np.zeros(max_len, dtype=self.pos_dtype)
        self._fill = 0
        self.num_blocks = 0
        self.num_docs = 0
        self.num_tokens = 0        # real (non-padding) tokens written
        self.num_target_tokens = 0
        self.num_split_docs = 0    # documents that straddle a block boundary
        self.num_mid_padding = 0   # padding written by add_whole before a document that did not fit

    def add(self, ids, mask=None) -> None:
        """Appends one document (see the class doc)."""
        ids = np.asarray(ids, dtype=np.int64)
        self.add_docs(ids, [len(ids)], mask)

    def add_docs(self, ids, lengths, mask=None) -> None:
        """Appends several documents at once, given as the concatenation of their ids (``ids``, BOS/EOS
        included) and their ``lengths`` (``mask``: the concatenated loss masks, default all ones). The
        same bytes as one :meth:`add` per document, in vectorised numpy: preprocessing hands each chunk of
        tunes over as one array, so the writer costs no Python per document."""
        ids = np.asarray(ids)
        lengths = np.asarray(lengths, dtype=np.int64)
        total = int(lengths.sum())
        if total != len(ids):
            raise ValueError(f"lengths sum to {total} but there are {len(ids)} ids")
        mask = np.ones(total, dtype=np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8)
        if len(mask) != total:
            raise ValueError(f"mask length {len(mask)} != ids length {total}")
        lengths = lengths[lengths > 0]          # an empty document is no document
        if not total:
            return
        L = self.max_len
        start = self.num_blocks * L + self._fill            # stream position of ids[0]
        doc_start = start + np.cumsum(lengths) - lengths
        # a document straddles when its first and last token fall in different blocks
        self.num_split_docs += int(np.count_nonzero(doc_start // L != (doc_start + lengths - 1) // L))
        self.num_docs += len(lengths)
        self.num_tokens += total
        self.num_target_tokens += int(np.count_nonzero(mask))
        # every piece starts at position 0: a document's start or a block's start, whichever is later
        g = np.arange(start, start + total, dtype=np.int64)
        pos = g - np.maximum(np.repeat(doc_start, lengths), g - g % L)
        off = 0
        if self._fill:                                      # top up the open block
            off = min(total, L - self._fill)
            s = slice(self._fill, self._fill + off)
            self._tok[s], self._mask[s], self._pos[s] = ids[:off], mask[:off], pos[:off]
            self._fill += off
            if self._fill == L:
                self._flush()
        if full := (total - off) // L * L:                  # whole blocks go straight to the files
            s = slice(off, off + full)
            self._f_tok.write(ids[s].astype(self.tok_dtype).tobytes())
            self._f_mask.write(mask[s].tobytes())
            self._f_pos.write(pos[s].astype(self.pos_dtype).tobytes())
            self.num_blocks += full // L
            off += full
        if rest := total - off:                             # the rest opens a new block
            self._tok[:rest], self._mask[:rest], self._pos[:rest] = ids[off:], mask[off:], pos[off:]
            self._fill = rest

    def add_whole(self, ids, mask=None) -> None:
        """Like :meth:`add`, but a document that does not fit the rest of the current block starts a new one
        (the rest is padded: mask 0, positions continuing, like the final padding), so an SFT conversation
        is never split over two blocks unless it is longer than one."""
        if self._fill and self._fill + len(ids) > self.max_len:
            self.num_mid_padding += self._pad_and_flush()
        self.add(ids, mask)

    def _pad_and_flush(self) -> int:
        """Pads the current partial block and writes it; the number of padding tokens."""
        pad = self.max_len - self._fill
        # padding continues the last segment's positions so it never opens a fake document
        last = int(self._pos[self._fill - 1])
        self._pos[self._fill:] = np.arange(last + 1, last + 1 + pad)
        self._flush()
        return pad

    def _flush(self) -> None:
        self._f_tok.write(self._tok.tobytes())
        self._f_mask.write(self._mask.tobytes())
        self._f_pos.write(self._pos.tobytes())
        self.num_blocks += 1
        self._tok.fill(self.pad_id)
        self._mask.fill(0)
        self._pos.fill(0)
        self._fill = 0

    def close(self) -> dict:
        """Pads and writes the last partial block; returns this split's statistics."""
        pad = self._pad_and_flush() if self._fill else 0
        for f in (self._f_tok, self._f_mask, self._f_pos):
            f.close()
        total = self.num_blocks * self.max_len
        return {
            "num_blocks": self.num_blocks,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "num_target_tokens": self.num_target_tokens,
            "num_padding_tokens": pad + self.num_mid_padding,
            "num_split_docs": self.num_split_docs,
            "packing_efficiency": (self.num_tokens / total) if total else 0.0,
        }


@dataclass
class Split:
    """A read-only view of one split: three ``[num_blocks, max_len]`` memmaps."""

    tokens: np.memmap
    loss_mask: np.memmap
    pos: np.memmap

    def __len__(self) -> int:
        return self.tokens.shape[0]


def write_meta(out_dir: str | os.PathLike, meta: dict) -> None:
    """Writes ``meta.json`` atomically. Required keys: mode, max_len, vocab_size, pad_id, bos_id, eos_id,
    splits (per-split stats from :meth:`ShardWriter.close`); tokenizer identity, counts and versions
    are added by the preprocess tool."""
    for k in ("mode", "max_len", "vocab_size", "pad_id", "bos_id", "eos_id", "splits"):
        if k not in meta:
            raise KeyError(f"meta.json needs '{k}'")
    meta = {"format": FORMAT, "token_dtype": token_dtype(meta["vocab_size"]).name,
            "pos_dtype": pos_dtype(meta["max_len"]).name, **meta}
    p = Path(out_dir) / "meta.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)


def read_meta(data_dir: str | os.PathLike) -> dict:
    p = Path(data_dir) / "meta.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no meta.json; run `python -m data_preprocess.preprocess -o {data_dir} ...` first")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p}: format {meta.get('format')!r} is not {FORMAT!r}; re-run data_preprocess")
    return meta


def open_split(data_dir: str | os.PathLike, split: str, meta: dict | None = None) -> Split:
    meta = meta or read_meta(data_dir)
    L = int(meta["max_len"])
    d = Path(data_dir)

    def mm(name, dtype):
        f = d / f"{split}.{name}.bin"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing shard file; re-run data_preprocess")
        size = f.stat().st_size
        item = np.dtype(dtype).itemsize
        if size % (L * item):
            raise ValueError(f"{f}: size {size} is not a whole number of {L}-token blocks (truncated write?)")
        if size == 0:
            return np.zeros((0, L), dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r", shape=(size // (L * item), L))

    s = Split(mm("tokens", meta["token_dtype"]), mm("loss_mask", np.uint8), mm("pos", meta["pos_dtype"]))
    if not (s.tokens.shape == s.loss_mask.shape == s.pos.shape):
        raise ValueError(f"{d}: {split} shard files disagree in block count; re-run data_preprocess")
    return s

"""Bits per character (and per token) of held-out ABC text: "how well does the model compress music".

    python -m benchmarks.bits_per_char --model M [--lora_model L] --data D [--stride 512]

``D`` is one of:
* an ABC/text file or a directory of ``.abc``/``.txt`` files: each tune (split at ``X:`` lines; a file
  without ``X:`` is one document) is scored as a document ``BOS tune``, with a sliding window of
  ``max_length`` tokens advanced by ``stride`` tokens for long tunes (every token is predicted once,
  with up to ``max_length - stride`` tokens of context carried over);
* a shards directory written by ``data_preprocess.preprocess`` (has ``meta.json``): its ``val`` split
  (``--split``), with the shards' own tokenizer recorded in meta.json. Each packed block is cut into
  its documents (``pos == 0`` marks a start) and every document piece is scored on its own.

bits/char = total negative log2-likelihood of the text tokens / number of characters of the text
they decode to; bits/token = the same over the number of tokens. Special tokens (BOS/EOS/pad) are
neither predicted nor counted. gzip -9 on the same text is reported as a classical reference.
"""
from __future__ import annotations

import gzip
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.abc_metrics import split_tunes
from benchmarks.common import (
    ModelArgs,
    default_output,
    environment,
    load,
    markdown_table,
    model_max_length,
    parse_config,
    score_continuations,
    write_json,
    write_jsonl,
)
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from data_preprocess.shards import open_split, read_meta

LN2 = math.log(2)


def read_documents(path: str, limit: int | None = None) -> list[str]:
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".parquet", ".arrow"):
        raise ArgumentError(f"{p}: --data takes ABC text (a .abc/.txt file or a dir of them) or a shards dir of "
                         "data_preprocess.preprocess; for a JSONL corpus run preprocess on it first")
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in (".abc", ".txt") and f.is_file())
        if not files:
            raise ArgumentError(f"{p}: no .abc or .txt files")
    else:
        raise ArgumentError(f"{p}: no such file or directory")
    docs: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        tunes = split_tunes(text)
        docs += tunes if tunes else ([text] if text.strip() else [])
        if limit and len(docs) >= limit:
            return docs[:limit]
    return docs


def windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests that predict ``ids[1:]`` exactly once (``ids[0]`` is BOS)."""
    reqs = []
    done = 1  # ids[:done] already predicted or given
    while done < len(ids):
        end = min(done + stride, len(ids))
        start = max(0, end - max_length - 1)
        reqs.append((ids[start:done], ids[done:end]))
        done = end
    return reqs


@dataclass
class BPCConfig(ModelArgs):
    data: str = None
    """ABC/text file or dir, or a shards dir (meta.json) whose --split is scored"""
    split: str = "val"
    """shards split to score (shards input only)"""
    stride: int | None = None
    """sliding-window step in tokens (default: max_length // 2)"""
    limit: int | None = None
    """at most this many documents / blocks"""

    def validate(self):
        if not self.data:
            raise ArgumentError("--data is required (ABC file/dir or shards dir)")


def _text_requests(cfg: BPCConfig, tok, max_len: int, stride: int):
    docs = read_documents(cfg.data, cfg.limit)
    if not docs:
        raise ArgumentError(f"{cfg.data}: no text to score")
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}
    reqs, counted, doc_of, texts, chars = [], [], [], [], []
    bos = [tok.bos_token_id] if (cfg.add_bos and tok.bos_token_id is not None) else []
    for d in docs:
        ids = tok.encode(d, add_special_tokens=False)
        if not ids:
            continue
        # with BOS every text token is predicted; without it the first token is only context
        chars.append(len(d) if bos else len(tok.decode(ids[1:])))
        texts.append(d)
        for ctx, cont in windows(bos + ids, max_len, stride):
            reqs.append((ctx, cont))
            counted.append([t not in special for t in cont])
            doc_of.append(len(texts) - 1)
    return reqs, counted, doc_of, texts, chars, len(docs)


def _shard_requests(cfg: BPCConfig, tok, max_len: int, stride: int):
    import numpy as np

    meta = read_meta(cfg.data)
    split = open_split(cfg.data, cfg.split, meta)
    special = {meta.get("bos_id"), meta.get("eos_id"), meta.get("pad_id")} - {None}
    reqs, counted, doc_of, texts, chars = [], [], [], [], []
    n_blocks = len(split) if not cfg.limit else min(cfg.limit, len(split))
    for b in range(n_blocks):
        toks = np.asarray(split.tokens[b], dtype=np.int64)
        mask = np.asarray(split.loss_mask[b], dtype=bool)
        starts = list(np.flatnonzero(np.asarray(split.pos[b]) == 0)) + [len(toks)]
        for a, z in itertools.pairwise(starts):
            seg = toks[a:z].tolist()
            keep = [i for i in range(1, len(seg)) if mask[a + i] and seg[i] not in special]
            if not keep:
                continue
            # score the whole piece; count only the kept (loss-mask, non-special) targets
            kept = set(keep)
            flags = [i in kept for i in range(1, len(seg))]
            piece = tok.decode([seg[i] for i in keep])
            texts.append(piece)
            chars.append(len(piece))
            for ctx, cont in windows(seg, max_len, stride):
                reqs.append((ctx, cont))
                counted.append(flags[:len(cont)])
                doc_of.append(len(texts) - 1)
                flags = flags[len(cont):]
    return reqs, counted, doc_of, texts, chars, n_blocks


def figures(nll: list[float], n_chars: list[int], n_tokens: list[int] | None, texts: list[str]) -> dict:
    """Bits per char / token and gzip -9's bits per char from per-document sums of token negative
    log-likelihoods (nats) and the documents' texts. The one formula behind :func:`run` and the
    ``evaluate`` module ``benchmarks/metrics/bits_per_char``."""
    total, chars = sum(nll), sum(n_chars)
    n_tok = sum(n_tokens) if n_tokens is not None else None
    text = "".join(texts)
    bits = total / LN2
    return {"n_chars": chars, "n_tokens": n_tok,
            "chars_per_token": chars / n_tok if n_tok else None,
            "bits_per_char": bits / chars if chars else None,
            "bits_per_token": bits / n_tok if n_tok else None,
            "perplexity_per_token": math.exp(total / n_tok) if n_tok else None,
            "gzip_bits_per_char": len(gzip.compress(text.encode("utf-8"), 9)) * 8 / max(1, len(text))}


def run(cfg: BPCConfig, loaded=None) -> dict:
    """Scores ``cfg.data``; writes the result JSON and a JSONL of per-document ``nll`` (nats), ``n_tokens``,
    ``n_chars`` and ``text`` next to it (what the ``bits_per_char`` evaluate module takes)."""
    is_shards = (Path(cfg.data) / "meta.json").is_file()
    if is_shards and not cfg.tokenizer:
        tok_dir = Path(cfg.data) / "tokenizer"
        meta_tok = read_meta(cfg.data).get("tokenizer", {}).get("path")
        cfg.tokenizer = str(tok_dir) if tok_dir.is_dir() else meta_tok
    loaded = loaded or load(cfg)
    tok = loaded.tokenizer
    max_len = model_max_length(loaded.model, cfg.max_length)
    stride = cfg.stride or max(1, max_len // 2)
    if stride > max_len:
        raise ArgumentError(f"--stride {stride} exceeds max_length {max_len}")
    t0 = time.time()
    build = _shard_requests if is_shards else _text_requests
    reqs, counted, doc_of, texts, chars, n_docs = build(cfg, tok, max_len, stride)
    # every window is scored whole; only the counted targets (text, not special/prompt) enter the sums
    per_tok = _token_logprobs(loaded, reqs, cfg)
    nll, n_tok = [0.0] * len(texts), [0] * len(texts)
    for flags, lps, d in zip(counted, per_tok, doc_of):
        for keep, lp in zip(flags, lps):
            if keep:
                nll[d] -= lp
                n_tok[d] += 1
    result = {
        "benchmark": "bits_per_char",
        "data": cfg.data,
        "input": "shards" if is_shards else "text",
        "n_documents": n_docs,
        **figures(nll, chars, n_tok, texts),
        "max_length": max_len,
        "stride": stride,
        "seconds": time.time() - t0,
        "config": vars(cfg),
        "environment": environment(),
    }
    out = Path(cfg.output) if cfg.output else default_output("bits_per_char", cfg.model, cfg.lora_model)
    records = [{"nll": a, "n_tokens": b, "n_chars": c, "text": t} for a, b, c, t in zip(nll, n_tok, chars, texts)]
    result["per_document"] = str(write_jsonl(out.with_suffix(".jsonl"), records))
    write_json(out, result)
    result["output"] = str(out)
    return result


def _token_logprobs(loaded, reqs, cfg: BPCConfig) -> list[list[float]]:
    """Per-token log-probs of every window's continuation (one forward pass per window)."""
    scores = score_continuations(loaded.model, reqs, loaded.tokenizer.pad_token_id, cfg.batch_size,
                                 model_max_length(loaded.model, cfg.max_length), loaded.device,
                                 desc="bits/char", per_token=True)
    return [s.token_logprobs for s in scores]


def report(result: dict) -> str:
    rows = [["bits per character", result["bits_per_char"]], ["bits per token", result["bits_per_token"]],
            ["perplexity per token", result["perplexity_per_token"]], ["characters per token", result["chars_per_token"]],
            ["gzip -9 bits per character (reference)", result["gzip_bits_per_char"]],
            ["documents", result["n_documents"]], ["characters", result["n_chars"]], ["tokens", result["n_tokens"]]]
    return markdown_table([f"held-out ABC: {Path(result['data']).name}", "value"], rows)


@exit_on_argument_error
def main(argv=None) -> int:
    cfg = parse_config(BPCConfig, argv, __doc__)
    result = run(cfg)
    print(report(result))
    print(f"\nresults: {result['output']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

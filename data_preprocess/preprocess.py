"""Corpus -> packed token shards (the training input), for continual pretraining (pt) or SFT.

    python -m data_preprocess.preprocess -t TOKENIZER -i music21 -o data/pt  --mode pt  --max_len 2048 -w 2
    python -m data_preprocess.preprocess -t TOKENIZER -i music21 -o data/sft --mode sft --make_sft_from_metadata
    python -m data_preprocess.preprocess -t TOKENIZER -i chats.jsonl -o data/sft --mode sft

Flags follow ChatMusician's data_preprocess (``-t -i -o -w``); every option is also a config key
(``--config job.yaml``, trailing ``key=value`` overrides).

* ``pt``: every tune becomes ``<s> tune </s>``, packed back to back into ``max_len`` blocks (a tune
  longer than what is left continues in the next block, never dropped; positions reset per tune).
* ``sft``: conversations in the model's chat format (:mod:`data_preprocess.chat_format`: the tokenizer's own
  template, e.g. SmolLM2's ChatML, else ChatMusician's ``Human: … </s> Assistant: … </s>``; recorded as
  ``sft_format`` in meta.json), loss only on the answers; a conversation is kept inside one block
  (the block is padded when it does not fit) and one longer than ``max_len`` is truncated and counted.

Train/val assignment is a hash of the tune's music (stable when the corpus grows). When ``val_ratio > 0``
but no tune (or record) hashed into val and there are at least two, the job is written a second time
with the one of lowest hash moved to val, so a small corpus still gets a val split; an empty val split
is always reported as a warning. Tokenisation is
the fast tokenizer's batch encode on chunks of tunes; ``-w N`` spreads chunks (and the optional
``--check abc2midi``) over N processes while results are written in input order, so the output is
byte-identical for any N. Memory stays flat: tunes stream from disk to the shard files.

Speed (pt, ``-w N > 1``): the workers are forked first and one of them loads the tokenizer (transformers
imports torch: ~2.5 s) and writes ``OUT/tokenizer`` while the main process -- which never imports either --
reads, checks and deduplicates the corpus, and the other workers already encode it with the ``tokenizers``
library's ``Tokenizer`` of the ``-t`` dir's own ``tokenizer.json`` (the copy is then checked to encode the same,
else the pass runs again with the copy; without a ``tokenizer.json``, e.g. a ``.model``, they wait for the copy).
Each chunk comes back as one int32 array, which :meth:`ShardWriter.add_docs` packs without Python per tune.
``python -m benchmarks.preprocess_speed`` measures it against ChatMusician's ``datasets.map`` and the bare
``tokenizers`` batch encode.

Outputs in OUT: ``{train,val}.{tokens,loss_mask,pos}.bin`` + ``meta.json`` (:mod:`data_preprocess.shards`),
``rejects.jsonl`` (file, tune index, reason), ``tokenizer/`` (a copy, so training loads it from here).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_preprocess import config as cfgmod
from data_preprocess.abctools import require
from data_preprocess.audio import maybe_run_from_preprocess
from data_preprocess.chat_format import ChatFormat, ensure_chat_template
from data_preprocess.corpus import (
    CorpusStats,
    Reject,
    abc2midi_problem,
    iter_tunes,
    split_from_hash,
    split_hash,
)
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from data_preprocess.model_source import resolve_source
from data_preprocess.sft import (
    iter_sft_records,
    metadata_conversations,
)
from data_preprocess.shards import SPLITS, ShardWriter, read_meta, write_meta
from data_preprocess.train_tokenizer import (
    batch_encode,
    tokenizer_identity,
)


@dataclass
class PreprocessConfig:
    tokenizer: str = ""
    """HF tokenizer dir / hub id, a SentencePiece .model, a .gguf or smollm2-135m (required)"""
    input: str = "music21"
    """dir of .abc/.txt, a .jsonl, a datasets dir / file / hub id, or music21 (the embedded corpus)"""
    output_dir: str = ""
    """output dir: shards, meta.json, rejects.jsonl and a copy of the tokenizer (required; never an input's dir)"""
    mode: str = "pt"
    """pt | sft (``--mode audio`` runs data_preprocess.audio: see its --help)"""
    content: str = "abc"
    """abc: ABC tunes (split at X:, checked, deduplicated by their music); text: plain-text documents (a
    JSONL/datasets record or a .txt/.md file each), pt only -- the general-text side of a data_weights mixture"""
    max_len: int = 2048
    """tokens per packed block (the training sequence length)"""
    workers: int = 1
    """processes for tokenisation / abc2midi (1 = in this process)"""
    val_ratio: float = 0.02
    """share of tunes / records in the val split (by a hash of each, so a tune never moves between splits)"""
    seed: int = 0
    """salt of the hash-based train/val split"""
    text_field: str = "text"
    """JSONL / datasets field holding the ABC text or document"""
    limit: int | None = None
    """stop after this many kept tunes / records"""
    check: str = "none"
    """none | abc2midi (run the real abc2midi on every tune)"""
    strict: bool = False
    """any reject -> exit status 1 (outputs are still written)"""
    make_sft_from_metadata: bool = False
    """sft from ABC metadata (text->music, music->text)"""
    music2text_fraction: float = 0.25
    """with --make_sft_from_metadata: the share of tunes that also give a music->text conversation (every tune gives
    a text->music one)"""
    max_line_len: int = 4096
    """a line longer than this many characters rejects its tune (binary junk, minified dumps)"""
    dedup: bool = True
    """drop a tune whose music (header-insensitive) was already kept (--no_dedup keeps them)"""
    chunk_size: int = 512
    """tunes per tokenisation batch / worker job"""
    overwrite: bool = False
    """allow writing into a non-empty dir that is not a previous output"""
    progress: bool = True
    """a progress bar on stderr (--no_progress for logs)"""
    num_shards: int = 1
    """split the corpus into this many parts (one machine / job each) ..."""
    shard_index: int = 0
    """... and write part i only; `python -m data_preprocess.merge_parts` joins them"""

    def __post_init__(self):
        if not self.tokenizer:
            raise ArgumentError("preprocess: -t/--tokenizer is required (an HF tokenizer dir or a .model file; "
                             "train one with `python -m data_preprocess.train_tokenizer -o DIR`)")
        if not self.output_dir:
            raise ArgumentError("preprocess: -o/--output_dir is required")
        if self.mode not in ("pt", "sft"):
            raise ArgumentError(f"preprocess: --mode must be pt or sft, got {self.mode!r}")
        if self.content not in ("abc", "text"):
            raise ArgumentError(f"preprocess: --content must be abc or text, got {self.content!r}")
        if self.content == "text" and (self.mode != "pt" or self.check != "none"):
            raise ArgumentError("preprocess: --content text is plain text for pretraining: it needs --mode pt and "
                             "--check none")
        if self.check not in ("none", "abc2midi"):
            raise ArgumentError(f"preprocess: --check must be none or abc2midi, got {self.check!r}")
        if self.max_len < 16:
            raise ArgumentError(f"preprocess: --max_len must be >= 16, got {self.max_len}")
        if not 0 <= self.val_ratio < 1:
            raise ArgumentError(f"preprocess: --val_ratio must be in [0, 1), got {self.val_ratio}")
        if self.workers < 1 or self.chunk_size < 1:
            raise ArgumentError("preprocess: --workers and --chunk_size must be >= 1")
        if not 0 <= self.music2text_fraction <= 1:
            raise ArgumentError(f"preprocess: --music2text_fraction must be in [0, 1], got {self.music2text_fraction}")
        if self.make_sft_from_metadata and self.mode != "sft":
            raise ArgumentError("preprocess: --make_sft_from_metadata needs --mode sft")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ArgumentError(f"preprocess: --shard_index {self.shard_index} must be in 0..--num_shards-1 "
                             f"(--num_shards {self.num_shards}); parts are numbered from 0")


# ------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(path: str):
    """An HF tokenizer from a dir / hub id, a named model source or ``.gguf`` (its imported HF dir:
    :mod:`data_preprocess.model_source`), or a SentencePiece ``.model`` (wrapped via a temp dir:
    ``LlamaTokenizer(vocab_file=...)`` silently builds a 3-token tokenizer in transformers 5). A missing
    pad token, or pad == EOS, becomes ``<unk>`` (never EOS); a missing chat template becomes ChatMusician's
    (:func:`data_preprocess.chat_format.ensure_chat_template`)."""
    from transformers import AutoTokenizer

    path = resolve_source(path)  # smollm2-135m / X.gguf -> the cached import (ModelSourceError: exit 2)
    p = Path(path).expanduser()
    try:
        if p.is_file() and p.suffix == ".model":
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(p, Path(tmp) / "tokenizer.model")
                tok = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        else:
            tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - many loader errors; add what to do
        why = " ".join(str(e).split())[:300]  # one line, whatever the loader wrote
        raise ArgumentError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {why}); pass an HF "
                         "tokenizer dir or a SentencePiece .model") from None
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ArgumentError(f"{path}: tokenizer needs BOS and EOS tokens")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token_id is None or tok.unk_token_id == tok.eos_token_id:
            raise ArgumentError(f"{path}: tokenizer has no pad token distinct from EOS (and no <unk> to use)")
        tok.pad_token = tok.unk_token
    ensure_chat_template(tok)
    return tok


def save_tokenizer_copy(tok, src: str, dst: Path) -> None:
    """OUT/tokenizer: the tokenizer as used (incl. pad / chat template fixes) + tokenizer.model."""
    if dst.exists():
        shutil.rmtree(dst)
    tok.save_pretrained(dst)
    s = Path(src).expanduser()
    model = s if (s.is_file() and s.suffix == ".model") else s / "tokenizer.model"
    if model.is_file() and not (dst / "tokenizer.model").is_file():
        shutil.copyfile(model, dst / "tokenizer.model")


# ------------------------------------------------------------------------------------------ workers


class TokenizerPrepError(ArgumentError):
    """A tokenizer that cannot be used, raised in the worker that prepared it and handed back to the main
    process (a worker must not raise SystemExit: the pool would replace it and never answer)."""


def prepare_tokenizer(src: str, dst: str | Path, keep: bool = False):
    """Loads the -t tokenizer (:func:`load_tokenizer`), writes its copy to ``dst`` (OUT/tokenizer) and returns
    what the job needs of it: ``{vocab, bos_id, eos_id, pad_id, is_fast, identity}`` (``keep``: ``(tok, info)``).
    In a pt job with workers this runs in one of them, so the main process never imports transformers (and
    torch, ~2.5 s) and reads the corpus meanwhile."""
    try:
        tok = load_tokenizer(src)
    except ArgumentError as e:
        if keep:
            raise
        raise TokenizerPrepError(str(e)) from None
    save_tokenizer_copy(tok, src, Path(dst))
    info = {"vocab": len(tok), "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
            "is_fast": bool(getattr(tok, "is_fast", False)), "identity": tokenizer_identity(dst, tok)}
    return (tok, info) if keep else info


_TOK = None                      # sft: the HF tokenizer (chat template) of this process
_ENCODERS: dict[str, object] = {}  # pt: tokenizer dir -> its encoder, loaded once per process


def _init_worker(sft_tok_dir: str | None) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one process per core already
    if sft_tok_dir is not None:
        from transformers import AutoTokenizer

        _TOK = AutoTokenizer.from_pretrained(sft_tok_dir)


def _pool(workers: int, sft_tok_dir: str | None):
    """The worker processes (forked on Linux: they inherit what this process has imported)."""
    import multiprocessing as mp

    return mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
        workers, initializer=_init_worker, initargs=(sft_tok_dir,))


def pt_encoder(tok_dir: str):
    """The encoder of a pt job: the ``tokenizers`` library's ``Tokenizer`` of ``tok_dir/tokenizer.json`` (the
    copy :func:`prepare_tokenizer` wrote, i.e. the HF tokenizer's own backend: the same ids without importing
    transformers), or for a slow tokenizer without one the HF tokenizer itself."""
    enc = _ENCODERS.get(tok_dir)
    if enc is None:
        f = Path(tok_dir) / "tokenizer.json"
        if f.is_file():
            from tokenizers import Tokenizer

            enc = Tokenizer.from_file(str(f))
            enc.no_truncation()   # whole tunes: a tokenizer.json may carry a training job's truncation / padding
            enc.no_padding()
        else:
            from transformers import AutoTokenizer

            enc = AutoTokenizer.from_pretrained(tok_dir)
        _ENCODERS[tok_dir] = enc
    return enc


ENCODING_PARTS = ("normalizer", "pre_tokenizer", "model", "added_tokens")  # all an encode without special tokens reads


def local_tokenizer_json(src: str) -> Path | None:
    """``src/tokenizer.json`` when ``-t`` is a local HF tokenizer dir that has one (else None): pt workers start
    encoding with it at once instead of waiting ~3 s for :func:`prepare_tokenizer`'s copy."""
    p = Path(src).expanduser()
    return p / "tokenizer.json" if p.is_dir() and (p / "tokenizer.json").is_file() else None


def same_encoding(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files give the same ids to an encode without special tokens: equal
    normalizer, pre-tokenizer, model and added tokens (the post-processor and decoder do not touch those ids)."""
    ja, jb = (json.loads(Path(f).read_text(encoding="utf-8")) for f in (a, b))
    return all(ja.get(k) == jb.get(k) for k in ENCODING_PARTS)


class _EncoderChanged(Exception):
    """The HF tokenizer's copy encodes differently from the -t tokenizer.json the workers started with."""


def _job(job):
    """One chunk: optional abc2midi check, then batch tokenisation. Runs in a worker or in-process.

    pt:   items are tune texts, ``spec`` the tokenizer dir -> (problems, ids, lengths): one problem (or None)
          per item; the kept tunes' ``BOS tune EOS`` ids concatenated (int32; BOS and EOS are 0 here, the main
          process writes them: it may learn them after this chunk is encoded) and their lengths, so a chunk
          crosses the process boundary as two arrays and goes to :meth:`ShardWriter.add_docs` as is
    sft:  items are Conversations, or (tune text, [Conversation]) pairs when built from metadata
          -> [(problem, [(kind, ids, mask)])]
    """
    mode, items, check, spec = job
    if mode == "pt":
        tok_dir = spec
        problems = [abc2midi_problem(t) for t in items] if check else [None] * len(items)
        ok = [t for t, p in zip(items, problems) if p is None]
        enc = batch_encode(pt_encoder(tok_dir), ok) if ok else []
        lengths = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)) + 2
        ends = np.cumsum(lengths)
        ids = np.zeros(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
        body = np.ones(len(ids), dtype=bool)
        body[ends - lengths] = body[ends - 1] = False
        ids[body] = np.fromiter(itertools.chain.from_iterable(enc), dtype=np.int32, count=len(ids) - 2 * len(enc))
        return problems, ids, lengths
    # sft
    tok = _TOK
    if items and isinstance(items[0], tuple):
        problems = [abc2midi_problem(text) if check else None for text, _ in items]
        groups = [convs if p is None else [] for (_, convs), p in zip(items, problems)]
    else:
        problems, groups = [None] * len(items), [[c] for c in items]
    flat = [c for g in groups for c in g]
    enc = iter(ChatFormat(tok).encode_batch([c.messages for c in flat]))
    out = []
    for p, g in zip(problems, groups):
        docs = []
        for c in g:
            ids, mask = next(enc)
            docs.append((c.kind, np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)))
        out.append((p, docs))
    return out


def _read_ahead(items: Iterable, ready, cap: int) -> Iterator:
    """``items``, of which up to ``cap`` are taken at once while ``ready()`` is false: the corpus is read, split
    and checked while a worker prepares the tokenizer (memory: ``cap`` chunks, whatever the corpus size)."""
    it, buf = iter(items), []
    while len(buf) < cap and not ready():
        x = next(it, _END)
        if x is _END:
            break
        buf.append(x)
    yield from buf
    yield from it


_END = object()


class _Ready:
    """The result of work done in-process, with the ``ready()`` / ``get()`` of a pool's AsyncResult."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


def _ordered(jobs: Iterable, pool, inflight: int) -> Iterator:
    """(job, result) in submission order with at most ``inflight`` jobs queued (flat memory; unlike
    Pool.imap, which drains the whole input iterator into its task queue)."""
    if pool is None:
        # in-process: a helper thread encodes (Rust releases the GIL) while this one parses the next chunk
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as ex:
            q: deque = deque()
            for j in jobs:
                q.append((j, ex.submit(_job, j)))
                if len(q) >= 2:
                    j0, f = q.popleft()
                    yield j0, f.result()
            while q:
                j0, f = q.popleft()
                yield j0, f.result()
        return
    q = deque()
    for j in jobs:
        q.append((j, pool.apply_async(_job, (j,))))
        if len(q) >= inflight:
            j0, r = q.popleft()
            yield j0, r.get()
    while q:
        j0, r = q.popleft()
        yield j0, r.get()


def _chunks(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


# ------------------------------------------------------------------------------------------ main


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tunesmith", "numpy", "transformers", "tokenizers", "datasets", "music21", "sentencepiece"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def check_out_is_not_an_input(cfg) -> None:
    """-o is emptied and rewritten (``OUT/tokenizer`` is deleted first), so it may neither be nor contain the
    -t tokenizer or an -i input: a one-line :class:`ArgumentError` naming both, before anything is touched."""
    out = os.path.realpath(cfg.output_dir)
    for flag, value in (("-t/--tokenizer", cfg.tokenizer), ("-i/--input", cfg.input)):
        if not value or not Path(value).expanduser().exists():
            continue
        real = os.path.realpath(Path(value).expanduser())
        if real == out or real.startswith(out + os.sep):
            raise ArgumentError(f"-o/--output_dir {cfg.output_dir} contains {flag} {value}: preprocessing would delete "
                                "or overwrite it. Fix: choose another -o directory (or copy the input elsewhere)")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").is_file() and not overwrite:
        raise ArgumentError(f"{out}: exists, is not empty and holds no previous preprocess output; "
                         "pass --overwrite or choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)   # no stale meta beside half-written shards


def run(cfg: PreprocessConfig) -> dict:
    """Runs the whole job; returns the meta dict (also written to OUT/meta.json). See the module doc for
    the val split of a small corpus."""
    check_out_is_not_an_input(cfg)
    meta, candidate = _write(cfg)
    sizes = meta["counts"]["split_sizes"]
    if cfg.num_shards > 1:
        return meta  # (a part's val may be empty; merge_parts decides for the whole corpus)
    if cfg.val_ratio > 0 and not sizes["val"] and candidate is not None:
        meta, _ = _write(cfg, force_val=candidate)  # deterministic: the train unit of lowest split hash
        sizes = meta["counts"]["split_sizes"]
    if not sizes["val"]:
        why = ("--val_ratio is 0" if cfg.val_ratio <= 0 else
               "fewer than 2 kept tunes/records gave sequences, so none can be spared for val")
        print(f"warning: the val split is empty ({why}) and training needs one. Fix: preprocess at least 2 "
              "tunes/records with --val_ratio > 0 (default 0.02)", file=sys.stderr)
    return meta


READ_AHEAD_CHUNKS = 64          # chunks read (or encoded and held) ahead while a worker prepares the tokenizer
READ_AHEAD_TOKENS = 1 << 24     # encoded tokens held (64 MiB) at most until BOS / EOS are known


def _write(cfg: PreprocessConfig, force_val: str | None = None) -> tuple[dict, str | None]:
    """One pass over the input (``force_val``: a unit key sent to val whatever its hash). Returns the meta
    dict and the key of the train unit of lowest split hash when at least 2 distinct units went to train."""
    try:
        return _write_pass(cfg, force_val, early=True)
    except _EncoderChanged:
        print(f"note: the HF tokenizer loaded from {cfg.tokenizer} encodes differently from its tokenizer.json; "
              "encoding again with the loaded one", file=sys.stderr)
        return _write_pass(cfg, force_val, early=False)


def _write_pass(cfg: PreprocessConfig, force_val: str | None, early: bool) -> tuple[dict, str | None]:
    """:func:`_write`'s pass. ``early``: pt workers may start encoding with the -t dir's tokenizer.json before the
    HF tokenizer is loaded; the copy it writes is checked to encode the same (:func:`same_encoding`), else
    :class:`_EncoderChanged` (and the pass is run again without)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    out = Path(cfg.output_dir)
    _prepare_out(out, cfg.overwrite or not early)  # (a second pass rewrites the first's partial output)
    check = cfg.check == "abc2midi"
    if check:
        require("abc2midi")
    tok_dir = out / "tokenizer"
    pool, fmt = None, None
    if cfg.mode == "pt" and cfg.workers > 1:
        # fork the workers first, while this process is light, and let one of them load the tokenizer (it
        # imports transformers and torch, ~2.5-3.5 s) while this process reads the corpus and the others encode
        # it with the -t dir's own tokenizer.json, or (without one) while this process reads ahead
        pool = _pool(cfg.workers, None)
        prep = pool.apply_async(prepare_tokenizer, (cfg.tokenizer, str(tok_dir)))
    else:
        tok, tok_info = prepare_tokenizer(cfg.tokenizer, tok_dir, keep=True)
        prep = _Ready(tok_info)
        if cfg.mode == "sft":
            fmt = ChatFormat(tok)  # an unusable chat template fails here, before any work
        global _TOK
        _TOK = tok
        if cfg.workers > 1:
            pool = _pool(cfg.workers, str(tok_dir))

    stats = CorpusStats()
    rejects_f = open(out / "rejects.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    first_rejects: list[Reject] = []

    def on_reject(r: Reject) -> None:
        rejects_f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        if len(first_rejects) < 50:
            first_rejects.append(r)

    part = (cfg.shard_index, cfg.num_shards)
    lim = {"stats": stats, "on_reject": on_reject, "dedup": cfg.dedup, "limit": cfg.limit, "part": part}
    from_records = cfg.mode == "sft" and not cfg.make_sft_from_metadata
    if from_records:
        source = iter_sft_records(cfg.input, stats, on_reject, limit=cfg.limit, dedup=cfg.dedup, part=part)
    else:
        source = iter_tunes(cfg.input, text_field=cfg.text_field, max_line_len=cfg.max_line_len,
                            content=cfg.content, **lim)

    early_json = local_tokenizer_json(cfg.tokenizer) if early and cfg.mode == "pt" and pool is not None else None

    def jobs() -> Iterator:
        ready = (lambda: True) if early_json else prep.ready
        for chunk in _read_ahead(_chunks(source, cfg.chunk_size), ready, cap=READ_AHEAD_CHUNKS):
            if cfg.mode == "pt":
                payload = [t.text for t in chunk]
                if early_json is None:
                    info()                     # the copy's tokenizer.json: wait until it is written
                spec = str(early_json.parent if early_json else tok_dir)
            elif from_records:
                payload, spec = chunk, None
            else:
                payload, spec = [(t.text, metadata_conversations(t, cfg.music2text_fraction)) for t in chunk], None
            keys = [c.key for c in chunk] if from_records else [t.body_hash for t in chunk]
            locs = [(c.file, c.index) for c in chunk]
            yield (cfg.mode, payload, check, spec), keys, locs

    def info() -> dict:
        return prep.get()  # (a TokenizerPrepError comes back as one line: exit_on_argument_error)

    writers: dict[str, ShardWriter] = {}
    sft_counts = {"conversations": 0, "text2music": 0, "music2text": 0, "truncated": 0, "truncated_tokens": 0,
                  "dropped_no_target": 0}
    longest = 0
    lowest_train: tuple[float, str] | None = None  # (split hash, key) of the val fallback candidate
    train_keys: set[str] = set()                   # distinct train units, counted up to 2
    bar = tqdm(unit=" tunes" if not from_records else " records", disable=not cfg.progress, dynamic_ncols=True,
               desc=f"preprocess {cfg.mode}")
    job_meta: deque = deque()

    def job_iter():
        for job, keys, locs in jobs():
            job_meta.append((keys, locs))
            yield job

    def split_for(key: str) -> str:
        """:func:`split_of`, with the val fallback candidate tracked from the same hash."""
        nonlocal lowest_train
        h = split_hash(key, cfg.seed)
        if key == force_val or split_from_hash(h, cfg.val_ratio) == "val":
            return "val"
        lowest_train = (h, key) if lowest_train is None else min(lowest_train, (h, key))
        if len(train_keys) < 2:
            train_keys.add(key)
        return "train"

    special: dict[str, int] = {}

    def open_writers() -> None:
        """Once the tokenizer is prepared (waits for it): the writers, BOS / EOS, and the early encoder checked."""
        meta_tok = info()
        if early_json is not None and not same_encoding(early_json, tok_dir / "tokenizer.json"):
            raise _EncoderChanged
        special.update(bos=meta_tok["bos_id"], eos=meta_tok["eos_id"])
        writers.update({s: ShardWriter(out, s, cfg.max_len, meta_tok["vocab"], meta_tok["pad_id"]) for s in SPLITS})

    def write(keys, locs, result) -> None:
        nonlocal longest
        if cfg.mode == "pt":
            problems, ids, lengths = result
            ends = np.cumsum(lengths)
            ids[ends - lengths], ids[ends - 1] = special["bos"], special["eos"]
            val = np.zeros(len(lengths), dtype=bool)
            j = 0
            for key, (file, index), problem in zip(keys, locs, problems):
                if problem is not None:
                    stats.kept -= 1
                    stats.reject(Reject(file, index, "abc2midi", problem), on_reject)
                    continue
                val[j] = split_for(key) == "val"
                j += 1
            for split, sel in (("train", ~val), ("val", val)):
                if sel.any():
                    writers[split].add_docs(ids[np.repeat(sel, lengths)], lengths[sel])
            longest = max(longest, int(lengths.max(initial=0)))
            return
        for key, (file, index), (problem, docs) in zip(keys, locs, result):
            if problem is not None:
                stats.kept -= 1
                stats.reject(Reject(file, index, "abc2midi", problem), on_reject)
                continue
            w = writers[split_for(key)]
            for kind, ids, mask in docs:
                longest = max(longest, len(ids))
                if len(ids) > cfg.max_len:
                    sft_counts["truncated"] += 1
                    sft_counts["truncated_tokens"] += len(ids) - cfg.max_len
                    ids, mask = ids[:cfg.max_len], mask[:cfg.max_len]
                    if not mask.any():
                        sft_counts["dropped_no_target"] += 1
                        continue
                sft_counts["conversations"] += 1
                sft_counts[kind] = sft_counts.get(kind, 0) + 1
                w.add_whole(ids, mask)

    pending: deque = deque()      # encoded chunks not yet written (only while the tokenizer is being prepared)
    held = 0

    def drain() -> None:
        nonlocal held
        if not writers:
            open_writers()
        while pending:
            write(*pending.popleft())
        held = 0

    try:
        for job, result in _ordered(job_iter(), pool, inflight=2 * cfg.workers + 1):
            keys, locs = job_meta.popleft()
            pending.append((keys, locs, result))
            held += len(result[1]) if cfg.mode == "pt" else 0
            if writers or prep.ready() or held >= READ_AHEAD_TOKENS or len(pending) >= READ_AHEAD_CHUNKS:
                drain()
            bar.update(len(keys))
            bar.set_postfix(kept=stats.kept, rejected=sum(stats.rejected.values()), dup=stats.duplicates,
                            refresh=False)
        drain()
    except BaseException:
        if pool is not None:
            pool.terminate()   # (a worker may still be loading the tokenizer: do not wait for it)
        raise
    finally:
        bar.close()
        rejects_f.close()
        if pool is not None:
            pool.close()
            pool.join()
    meta_tok = info()
    if not meta_tok["is_fast"]:
        print(f"warning: {cfg.tokenizer} is a slow (python) tokenizer; preprocessing was slow", file=sys.stderr)
    split_stats = {s: w.close() for s, w in writers.items()}

    tokens = sum(s["num_tokens"] for s in split_stats.values())
    blocks = sum(s["num_blocks"] for s in split_stats.values())
    counts = {**stats.to_json(), "sequences": sum(s["num_docs"] for s in split_stats.values()), "tokens": tokens,
              "target_tokens": sum(s["num_target_tokens"] for s in split_stats.values()), "blocks": blocks,
              "packing_efficiency": tokens / (blocks * cfg.max_len) if blocks else 0.0,
              "longest_sequence_tokens": longest,
              "split_sizes": {s: split_stats[s]["num_docs"] for s in SPLITS}, "val_fallback": force_val}
    if cfg.mode == "sft":
        counts["sft"] = sft_counts
    if cfg.mode == "sft" and sft_counts["truncated"]:
        print(f"warning: {sft_counts['truncated']} conversations longer than --max_len {cfg.max_len} were "
              f"truncated ({sft_counts['truncated_tokens']} tokens cut; {sft_counts['dropped_no_target']} "
              "dropped because no answer token was left)", file=sys.stderr)
    elapsed = time.time() - t0
    meta = {
        "mode": cfg.mode, "content": cfg.content, "max_len": cfg.max_len, "vocab_size": meta_tok["vocab"],
        "pad_id": meta_tok["pad_id"], "bos_id": meta_tok["bos_id"], "eos_id": meta_tok["eos_id"], "splits": split_stats,
        "tokenizer": {**meta_tok["identity"], "source": str(cfg.tokenizer)},
        "input": str(cfg.input), "counts": counts,
        "part": {"index": cfg.shard_index, "of": cfg.num_shards} if cfg.num_shards > 1 else None,
        "sft_format": fmt.name if fmt else None,
        "config": asdict(cfg), "versions": _versions(), "elapsed_s": round(elapsed, 3),
        "tunes_per_s": round(stats.tunes_read / elapsed, 1) if elapsed else None,
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
    }
    write_meta(out, meta)
    meta = read_meta(out)                 # exactly what training will read (incl. dtypes, format)
    meta["_first_rejects"] = first_rejects
    return meta, lowest_train[1] if lowest_train and len(train_keys) >= 2 else None


def summary_table(meta: dict) -> str:
    c = meta["counts"]
    rows = [("input", meta["input"]), ("mode", meta["mode"]), ("files", c["files"]),
            ("tunes read" if meta["mode"] == "pt" or c.get("sft", {}).get("text2music") is not None else "records",
             c["tunes_read"]),
            ("kept", c["kept"]), ("duplicates", c["duplicates"]), ("rejected", c["rejected_total"])]
    rows += [(f"  {k}", v) for k, v in c["rejected"].items()]
    if c.get("replaced_chars"):
        rows.append(("undecodable chars replaced", c["replaced_chars"]))
    if "sft" in c:
        rows += [(f"sft {k}", v) for k, v in c["sft"].items()]
    rows += [("sequences", c["sequences"]), ("tokens", c["tokens"]), ("target tokens", c["target_tokens"]),
             ("blocks", f"{c['blocks']} x {meta['max_len']}"), ("packing efficiency", f"{c['packing_efficiency']:.4f}"),
             ("train / val sequences", f"{c['split_sizes']['train']} / {c['split_sizes']['val']}"
              + (" (no unit hashed into val: the one of lowest hash was moved there)" if c.get("val_fallback") else "")),
             ("tokenizer", f"{meta['tokenizer']['path']} (vocab {meta['vocab_size']}, {meta['tokenizer']['hash']})"),
             ("time", f"{meta['elapsed_s']:.1f} s ({meta['tunes_per_s']} tunes/s, {meta['tokens_per_s']:.0f} tokens/s)")]
    w = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k!s:<{w}}  {v}" for k, v in rows)


def parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    ap = argparse.ArgumentParser(prog="python -m data_preprocess.preprocess", description=__doc__.split("\n")[0],
                                 argument_default=S)
    ap.add_argument("-t", "--tokenizer")
    ap.add_argument("-i", "--input")
    ap.add_argument("-o", "--output_dir")
    ap.add_argument("--mode", choices=("pt", "sft"))
    ap.add_argument("--content", choices=("abc", "text"))
    ap.add_argument("--max_len", type=int)
    ap.add_argument("-w", "--workers", type=int)
    ap.add_argument("--val_ratio", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--text_field")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--check", choices=("none", "abc2midi"))
    ap.add_argument("--strict", action="store_const", const=True)
    ap.add_argument("--make_sft_from_metadata", action="store_const", const=True)
    ap.add_argument("--music2text_fraction", type=float)
    ap.add_argument("--max_line_len", type=int)
    ap.add_argument("--no_dedup", dest="dedup", action="store_const", const=False)
    ap.add_argument("--chunk_size", type=int)
    ap.add_argument("--overwrite", action="store_const", const=True)
    ap.add_argument("--no_progress", dest="progress", action="store_const", const=False)
    ap.add_argument("--num_shards", type=int)
    ap.add_argument("--shard_index", type=int)
    ap.add_argument("--config", help="YAML/JSON file of options (overridden by flags and key=value)")
    ap.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    return ap


@exit_on_argument_error
def main(argv=None) -> int:
    if (rc := maybe_run_from_preprocess(argv)) is not None:  # --mode audio -> data_preprocess/audio.py
        return rc
    cfg = cfgmod.build(PreprocessConfig, parser(), argv)
    meta = run(cfg)
    first = meta.pop("_first_rejects")
    print(summary_table(meta))
    print(f"wrote {Path(cfg.output_dir) / 'meta.json'}")
    n_rej = meta["counts"]["rejected_total"]
    if n_rej:
        print(f"{n_rej} tunes rejected; list: {Path(cfg.output_dir) / 'rejects.jsonl'}")
    if cfg.strict and n_rej:
        for r in first:
            print(f"  rejected {r.file} tune {r.index}: {r.reason}: {r.detail}", file=sys.stderr)
        if n_rej > len(first):
            print(f"  ... and {n_rej - len(first)} more in rejects.jsonl", file=sys.stderr)
        print(f"--strict: {n_rej} rejected tunes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

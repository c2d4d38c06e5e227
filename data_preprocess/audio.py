"""Audio preprocessing: audio (+ captions) -> codec codes -> token layout -> the packed shard format.

    python -m data_preprocess.audio -t TOKENIZER_DIR -o OUT_DIR --codec CODEC_DIR [-i INPUT] [--layout delay]
    python -m data_preprocess.preprocess --mode audio ...      (same flags; dispatches to run_audio)

INPUT (``-i``):
  ``music21`` (default)   the embedded ABC corpus rendered to audio (abc2midi + fluidsynth, GM soundfont) with
                          captions from the tune metadata ("jig in D major, 6/8 time, played on violin: The
                          Kesh") -- paired symbolic/audio data without any download. A directory of .abc
                          files is rendered the same way.
  a folder of audio       .wav (other formats with the optional ``soundfile``), recursive; an optional
                          same-name ``.txt`` next to each file is its caption (MusicGen-trainer layout).
  a ``datasets`` dataset  a ``save_to_disk`` dir, a loadable data dir, or a hub id; the Audio column is read
                          undecoded (WAV bytes/paths) so no audio backend is needed; ``--caption_field``.
Long files are cut into ``--crop_seconds`` crops (a tail shorter than ``--min_crop_seconds`` is dropped and
counted). Whole source files go to one split, so crops of one recording never leak into validation.

CODEC (``--codec``): a local EnCodec dir (e.g. facebook/encodec_32khz) or ``random-tiny`` / ``random-small``,
which builds a randomly initialised EnCodec into OUT_DIR/codec (plumbing only: its sound is meaningless).

OUT_DIR gets the standard shards (``data_preprocess/shards.py``), ``meta.json`` with mode ``audio`` and an
``audio`` section (codec identity, layout, token ids, crop, caption dropout), and ``OUT_DIR/tokenizer/``: the
text tokenizer extended with ``<boa> <eoa> <fill>`` + one token per codebook code, carrying the same audio spec
in its ``tokenizer_config.json`` (key ``tunesmith_audio``) so a trained checkpoint knows its codec and layout.
Training mode ``audio`` is the pretraining path on these shards; a text LLaMA is resized to ``len(tokenizer)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_preprocess.abctools import abc_to_midi, midi_to_wav
from data_preprocess.audio_codec import (
    AUDIO_EXTS,
    AudioInputError,
    Codec,
    check_codec_dir,
    make_random_codec,
    random_codec_geometry,
    read_audio,
)
from data_preprocess.audio_layout import LAYOUTS, extend_tokenizer, make_layout
from data_preprocess.config import build
from data_preprocess.corpus import iter_tunes
from data_preprocess.hub import ArgumentError, could_be_hub_id, exit_on_argument_error, offline
from data_preprocess.model_source import resolve_source
from data_preprocess.sft import describe_key
from data_preprocess.shards import SPLITS, ShardWriter, read_meta, write_meta
from data_preprocess.train_tokenizer import tokenizer_identity

log = logging.getLogger("tunesmith.audio")

# General MIDI programs the ABC renderer picks from (the instrument is named in the caption).
INSTRUMENTS = {"piano": 0, "accordion": 21, "acoustic guitar": 24, "violin": 40, "flute": 73, "tin whistle": 78}


@dataclass
class AudioPrepConfig:
    """One audio preprocessing job (CLI flags, ``--config`` YAML/JSON and ``key=value`` use these names)."""

    tokenizer: str = ""
    """text tokenizer dir (extended with the audio tokens)"""
    output_dir: str = ""
    """output dir: shards, meta.json and the extended tokenizer (required)"""
    input: str = "music21"
    """audio dir / file, a datasets dir or hub id, or music21 (ABC tunes rendered to audio by abc2midi + fluidsynth)"""
    codec: str = "random-small"
    """codec dir, or random-tiny / random-small (meaningless sound)"""
    layout: str = "delay"
    """delay | flatten"""
    bandwidth: float | None = None
    """codec target bandwidth (kbps); None = the codec's first"""
    crop_seconds: float = 10.0
    """long files are cut into crops of this many seconds"""
    min_crop_seconds: float = 1.0
    """a tail shorter than this is dropped"""
    max_crops_per_file: int = 0
    """0 = every crop of every file"""
    caption_dropout: float = 0.1
    """share of crops with an empty caption (classifier-free guidance)"""
    max_caption_tokens: int = 64
    """captions are cut to this many text tokens"""
    caption_field: str = ""
    """datasets input: caption column ("" = caption/text/description)"""
    audio_field: str = ""
    """datasets input: audio column ("" = the first Audio feature)"""
    dataset_split: str = "train"
    """datasets input: split to read"""
    max_len: int = 0
    """block length; 0 = the longest possible document, rounded up to 64"""
    val_ratio: float = 0.02
    """share of source files in the val split (all crops of a file stay on one side)"""
    seed: int = 0
    """seed of the split and the caption dropout"""
    limit: int = 0
    """first N source files/tunes (0 = all)"""
    workers: int = 2
    """parallel audio loading / ABC rendering"""
    batch_size: int = 16
    """crops per codec forward"""
    device: str = "cpu"
    """cpu | cuda | cuda:N for the codec"""
    overwrite: bool = False
    """allow writing into a non-empty dir that is not a previous output"""


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Item:
    """One source recording: a key (file or tune id) and a loader returning ``(audio [C, N], sample_rate)``."""

    key: str
    caption: str
    load: Callable[[], tuple[np.ndarray, int]]


def abc_caption(meta: dict, instrument: str) -> str:
    """A caption in the words a user prompts with: "jig in D major, 6/8 time, played on violin: The Kesh"."""
    rhythm = (meta.get("rhythm") or "tune").strip().lower()
    parts = [rhythm]
    key = describe_key(meta.get("key", "")) or ""
    if key:
        parts[0] += f" in {key}"
    meter = {"C": "4/4", "C|": "2/2"}.get((meta.get("meter") or "").strip(), (meta.get("meter") or "").strip())
    if meter and meter.lower() != "none":
        parts.append(f"{meter} time")
    parts.append(f"played on {instrument}")
    cap = ", ".join(parts)
    return f"{cap}: {meta['title'].strip()}" if meta.get("title") else cap


def _abc_header(text: str) -> dict:
    meta = {}
    for field, name in (("T", "title"), ("R", "rhythm"), ("K", "key"), ("M", "meter"), ("L", "unit")):
        m = re.search(rf"^{field}:\s*(.*)$", text, re.MULTILINE)
        if m and m.group(1).strip():
            meta[name] = m.group(1).strip()
    return meta


def _iter_abc(source: str) -> Iterator[tuple[str, str, dict]]:
    """(key, tune text, metadata) from the corpus reader (a file, a dir, JSONL, a datasets dir or ``music21``)."""
    for t in iter_tunes(source):
        meta = dict(t.meta or {})
        for k, v in _abc_header(t.text).items():
            meta.setdefault(k, v)
        yield f"{t.file}#{t.index}", t.text, meta


def with_instrument(abc: str, program: int) -> str:
    """Inserts ``%%MIDI program N`` after the first ``K:`` line (the start of the tune body)."""
    lines = abc.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("K:"):
            return "\n".join(lines[: i + 1] + [f"%%MIDI program {program}"] + lines[i + 1:])
    return abc


def trim_silence(audio: np.ndarray, sample_rate: int, threshold: float = 1e-3, keep_s: float = 0.5) -> np.ndarray:
    """Drops the trailing near-silence of a rendering (the synthesiser's release tail), keeping ``keep_s``."""
    loud = np.flatnonzero(np.abs(audio).max(axis=0) > threshold)
    if not len(loud):
        return audio[:, :0]
    return audio[:, : min(audio.shape[1], loud[-1] + 1 + int(keep_s * sample_rate))]


def render_abc(abc: str, sample_rate: int, workdir: str | Path) -> tuple[np.ndarray, int]:
    """ABC -> MIDI (abc2midi) -> WAV (fluidsynth, GM soundfont) -> float audio ``[C, N]``."""
    wd = Path(tempfile.mkdtemp(prefix="ts_render_", dir=workdir))
    try:
        r = abc_to_midi(abc, wd / "t.mid")
        if not r.ok:
            raise ValueError("abc2midi failed: " + ("; ".join(r.errors) or r.log.strip()[-200:]))
        w = midi_to_wav(wd / "t.mid", wd / "t.wav", sample_rate=sample_rate)
        if not w.ok:
            raise ValueError("; ".join(w.errors))
        audio, sr = read_audio(wd / "t.wav")
        return trim_silence(audio, sr), sr
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def abc_items(source: str, sample_rate: int, workdir: str, seed: int) -> Iterator[Item]:
    names = sorted(INSTRUMENTS)
    for key, text, meta in _iter_abc(source):
        inst = names[random.Random(f"{seed}:{key}").randrange(len(names))]
        abc = with_instrument(text, INSTRUMENTS[inst])
        yield Item(key, abc_caption(meta, inst), lambda abc=abc: render_abc(abc, sample_rate, workdir))


def folder_items(folder: Path) -> Iterator[Item]:
    for f in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTS):
        cap_file = f.with_suffix(".txt")
        cap = cap_file.read_text(encoding="utf-8", errors="replace").strip() if cap_file.is_file() else ""
        yield Item(str(f), cap, lambda f=f: read_audio(f))


def dataset_items(source: str, split: str, audio_field: str, caption_field: str) -> Iterator[Item]:
    import datasets

    p = Path(source)
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(p))
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AudioInputError(f"-i {source}: not loadable as a datasets dataset ({why}). Fix: {INPUT_FIX}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{source}: no split {split!r} (has {list(ds)}); pass --dataset_split")
        ds = ds[split]
    audio_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Audio)]
    col = audio_field or (audio_cols[0] if audio_cols else "")
    if not col or col not in ds.column_names:
        raise ValueError(f"{source}: no audio column (columns: {ds.column_names}); pass --audio_field")
    cap_col = caption_field or next((c for c in ("caption", "text", "description") if c in ds.column_names), "")
    if caption_field and caption_field not in ds.column_names:
        raise ValueError(f"{source}: no caption column {caption_field!r} (columns: {ds.column_names})")
    ds = ds.cast_column(col, datasets.Audio(decode=False))   # raw bytes/paths: no audio backend needed
    for i, row in enumerate(ds):
        a = row[col]
        name = f"{source}[{i}]:{a.get('path') or col}"

        def load(a=a, name=name):
            if a.get("bytes"):
                return read_audio(a["bytes"], name=a.get("path") or name)
            return read_audio(a["path"])

        yield Item(name, str(row[cap_col]).strip() if cap_col and row[cap_col] is not None else "", load)


INPUT_FIX = ("-i takes music21, a dir of .abc files, a folder of audio (.wav; .txt captions next to them), a "
             "datasets save_to_disk dir or a Hub dataset id")


def _hub_dataset_cached(name: str) -> bool:
    """Whether the Hub dataset ``name`` is in the local Hub cache or in datasets' own cache."""
    import datasets
    from huggingface_hub import constants

    if (Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}").is_dir():
        return True
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    return cache.is_dir() and any(q.name.startswith(name.replace("/", "___")) for q in cache.iterdir())


def check_input(src: str) -> None:
    """Fails fast, in one line, on an ``-i`` that cannot be read: a local path that does not exist (it starts with
    ``.``, ``/`` or ``~``, has more than one ``/``, its first component exists locally, or it is not a valid Hub
    id) or, while HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set, a Hub id that is not cached. Existing paths and
    other Hub ids are left to the readers (``datasets`` fetches a Hub id)."""
    if src == "music21" or Path(src).expanduser().exists():
        return
    if not could_be_hub_id(src) or Path(src).suffix.lower() in (".abc", *AUDIO_EXTS):
        raise AudioInputError(f"-i {src}: no such file or directory. Fix: {INPUT_FIX}")
    if offline("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") and not _hub_dataset_cached(src):
        raise AudioInputError(f"-i {src}: no such local path, and as a Hub dataset id it is not cached while "
                              f"HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set. Fix: {INPUT_FIX} (download it where "
                              "there is network first)")


def source_items(cfg: AudioPrepConfig, sample_rate: int, workdir: str) -> tuple[str, list[Item]]:
    """Resolves ``cfg.input`` to a kind and its items (listing is cheap; audio is loaded later)."""
    src = cfg.input
    check_input(src)
    p = Path(src).expanduser()
    if src == "music21" or p.suffix == ".abc" or (p.is_dir() and any(p.rglob("*.abc"))
                                                  and not any(q.suffix.lower() in AUDIO_EXTS for q in p.rglob("*"))):
        kind, it = "abc", abc_items(src, sample_rate, workdir, cfg.seed)
    elif p.is_dir() and any(q.suffix.lower() in AUDIO_EXTS for q in p.rglob("*")):
        kind, it = "folder", folder_items(p)
    else:
        kind, it = "datasets", dataset_items(src, cfg.dataset_split, cfg.audio_field, cfg.caption_field)
    items = []
    for item in it:
        items.append(item)
        if cfg.limit and len(items) >= cfg.limit:
            break
    return kind, items


# ------------------------------------------------------------------------------------------------- crops


def crops_of(audio: np.ndarray, sample_rate: int, crop_s: float, min_s: float, max_crops: int) -> tuple[list, float]:
    """Fixed-length crops ``[C, crop]`` (+ a shorter tail if >= ``min_s``); returns (crops, dropped seconds)."""
    n, L, m = audio.shape[1], round(crop_s * sample_rate), round(min_s * sample_rate)
    out, dropped = [], 0.0
    for start in range(0, n, L):
        piece = audio[:, start:start + L]
        if piece.shape[1] < max(m, 1):
            dropped += piece.shape[1] / sample_rate
            continue
        if max_crops and len(out) >= max_crops:
            dropped += (n - start) / sample_rate
            break
        out.append(piece)
    return out, dropped


def val_keys(keys: list[str], ratio: float, seed: int) -> set[str]:
    """Whole sources for validation: round(n * ratio), at least 1 when ratio > 0 and n >= 2."""
    if ratio <= 0 or len(keys) < 2:
        return set()
    n = min(len(keys) - 1, max(1, round(len(keys) * ratio)))
    return set(random.Random(seed).sample(keys, n))


# -------------------------------------------------------------------------------------------------- main


def run_audio(cfg: AudioPrepConfig) -> dict:
    """Runs one audio preprocessing job; returns the meta.json dict. A bad codec / input / tokenizer argument
    raises :class:`AudioInputError` before OUT_DIR is touched; a failure while writing removes OUT_DIR."""
    t0 = time.time()
    if not cfg.tokenizer or not cfg.output_dir:
        raise ArgumentError("audio preprocessing needs -t/--tokenizer (a text tokenizer dir) and -o/--output_dir")
    if cfg.layout not in LAYOUTS:
        raise ArgumentError(f"--layout {cfg.layout!r}: choose one of {LAYOUTS}")
    if not 0.0 <= cfg.caption_dropout <= 1.0 or not 0.0 <= cfg.val_ratio < 1.0:
        raise ArgumentError("--caption_dropout must be in [0, 1] and --val_ratio in [0, 1)")
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ArgumentError(f"{out}: not empty; pass --overwrite to replace it")
    cfg.tokenizer = resolve_source(cfg.tokenizer)  # smollm2-135m / X.gguf -> its imported HF dir
    tok_dir = Path(cfg.tokenizer).expanduser()
    if (tok_dir.exists() or not could_be_hub_id(cfg.tokenizer)) and not (tok_dir / "tokenizer_config.json").is_file():
        raise AudioInputError(f"-t {cfg.tokenizer}: not a tokenizer dir (no tokenizer_config.json). Fix: pass a text "
                              "tokenizer dir, e.g. DATA_DIR/tokenizer of data_preprocess.preprocess or a base model dir")
    geometry = random_codec_geometry(cfg.codec)
    if geometry is None:
        check_codec_dir(cfg.codec, random_ok=True)
    check_input(cfg.input)

    with tempfile.TemporaryDirectory(prefix="ts_audio_") as workdir:
        # codec and input are resolved before OUT_DIR is touched: a bad argument leaves nothing behind
        codec_dir = cfg.codec if geometry is None else str(make_random_codec(Path(workdir) / "codec", geometry))
        codec = Codec(codec_dir, device=cfg.device, bandwidth=cfg.bandwidth)
        kind, items = source_items(cfg, codec.sample_rate, workdir)
        if not items:
            raise ArgumentError(f"{cfg.input}: no audio sources found")
        created = not out.exists()
        if not created:
            _empty_dir(out)       # --overwrite: only now is the old output removed
        out.mkdir(parents=True, exist_ok=True)
        try:
            return _write(cfg, out, codec, codec_dir, geometry, kind, items, t0)
        except BaseException:   # no half-written OUT_DIR: a rerun needs no --overwrite
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                _empty_dir(out)
            raise


def _empty_dir(d: Path) -> None:
    """Removes what is in ``d`` (not ``d`` itself: it may be a mount point or a dir the user made)."""
    for q in d.iterdir():
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q)
        else:
            q.unlink()


def _write(cfg: AudioPrepConfig, out: Path, codec: Codec, codec_dir: str, geometry: str | None, kind: str,
           items: list[Item], t0: float) -> dict:
    """Encodes ``items`` into the (empty) ``out``: codec copy, extended tokenizer, shards, meta.json."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    if geometry is not None:   # the random codec is kept with the data (inference decodes with it)
        codec_dir = str(shutil.copytree(codec_dir, out / "codec"))
    info = codec.info
    info.path = str(Path(codec_dir).resolve())

    # tokenizer: text + audio tokens, audio spec embedded
    text_tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    vocab = extend_tokenizer(tok, info.num_codebooks, info.codebook_size)
    layout = make_layout(cfg.layout, vocab)
    frames = codec.num_frames(round(cfg.crop_seconds * codec.sample_rate))
    longest = 1 + cfg.max_caption_tokens + 1 + layout.num_tokens(frames) + 2
    max_len = cfg.max_len or int(math.ceil(longest / 64) * 64)
    spec = {
        "codec": info.to_dict(), "layout": cfg.layout, "vocab": vocab.to_dict(),
        "crop_seconds": cfg.crop_seconds, "min_crop_seconds": cfg.min_crop_seconds,
        "caption_dropout": cfg.caption_dropout, "max_caption_tokens": cfg.max_caption_tokens,
        "tokens_per_second": layout.num_tokens(frames) / (frames / codec.frame_rate),
        "document": "<s> caption <boa> body <eoa> </s>; loss on codes + stop decisions",
    }
    tok.init_kwargs["tunesmith_audio"] = spec
    tok.model_max_length = max(max_len, getattr(tok, "model_max_length", 0) or 0)
    tok.save_pretrained(out / "tokenizer")

    if info.random_init:
        log.warning("encoding with a random codec: tokens are valid, but any decoded sound is meaningless")
    val = val_keys([it.key for it in items], cfg.val_ratio, cfg.seed)
    # ShardWriter.add_whole: a document never straddles two blocks (an audio document split in two would lose
    # its caption and <boa> context in the second half); the rest of a block it does not fit is padding
    writers = {s: ShardWriter(out, s, max_len, len(tok), tok.pad_token_id) for s in SPLITS}
    rng = random.Random(cfg.seed)
    counts = {"source_kind": kind, "sources": len(items), "sources_used": 0, "crops": {s: 0 for s in SPLITS},
              "seconds": {s: 0.0 for s in SPLITS}, "captions_dropped": 0, "captions_missing": 0,
              "dropped_seconds": 0.0, "num_skipped": 0, "skipped": []}
    pending: list[tuple[str, str, np.ndarray]] = []   # (split, caption, crop)

    def flush():
        # equal-length crops share a forward (no padding); a tail crop goes with its own length
        by_len: dict[int, list] = {}
        for p in pending:
            by_len.setdefault(p[2].shape[1], []).append(p)
        for group in by_len.values():
            codes = codec.encode([g[2] for g in group])
            for (split, cap, crop), c in zip(group, codes):
                drop = rng.random() < cfg.caption_dropout
                counts["captions_dropped"] += int(drop and bool(cap))
                cap_ids = [] if drop else text_tok.encode(cap, add_special_tokens=False)[: cfg.max_caption_tokens]
                ids, mask = layout.document(cap_ids, c, tok.bos_token_id, tok.eos_token_id)
                if len(ids) > max_len:
                    raise ValueError(f"an audio document has {len(ids)} tokens > max_len {max_len}; raise --max_len "
                                     "or lower --crop_seconds")
                writers[split].add_whole(ids, mask)
                counts["crops"][split] += 1
                counts["seconds"][split] += crop.shape[1] / codec.sample_rate
        pending.clear()

    def load(item: Item):
        try:
            audio, sr = item.load()
            return item, codec.prepare(audio, sr), None
        except Exception as e:  # noqa: BLE001 -- a bad source is reported and skipped, never fatal
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            return item, None, msg if msg.startswith(item.key) else f"{item.key}: {msg}"

    bar = tqdm(total=len(items), desc=f"audio {kind} -> {cfg.layout} tokens", unit="src", dynamic_ncols=True)
    chunk = max(4 * cfg.workers, cfg.batch_size)
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        for i in range(0, len(items), chunk):
            for item, audio, err in pool.map(load, items[i:i + chunk]):
                bar.update(1)
                if err:
                    log.warning("skipped %s", err)
                    counts["num_skipped"] += 1
                    if len(counts["skipped"]) < 100:   # the first 100 reasons; the count is exact
                        counts["skipped"].append(err)
                    continue
                crops, dropped = crops_of(audio, codec.sample_rate, cfg.crop_seconds, cfg.min_crop_seconds,
                                          cfg.max_crops_per_file)
                counts["dropped_seconds"] += dropped
                counts["sources_used"] += bool(crops)
                counts["captions_missing"] += int(not item.caption)
                split = "val" if item.key in val else "train"
                pending.extend((split, item.caption, c) for c in crops)
                if len(pending) >= cfg.batch_size:
                    flush()
            bar.set_postfix(crops=sum(counts["crops"].values()))
        flush()
    bar.close()

    splits = {s: w.close() for s, w in writers.items()}
    if not counts["crops"]["train"]:
        raise ArgumentError(f"{cfg.input}: no usable audio (skipped {counts['num_skipped']}: "
                         f"{counts['skipped'][:3]}); nothing written")
    import torch
    import transformers

    meta = {
        "mode": "audio", "max_len": max_len, "vocab_size": len(tok), "pad_id": tok.pad_token_id,
        "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "splits": splits,
        "tokenizer": {**tokenizer_identity(out / "tokenizer", tok), "text_tokenizer": str(Path(cfg.tokenizer).resolve())},
        "audio": spec, "counts": counts, "config": dataclasses.asdict(cfg),
        "versions": {"numpy": np.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "elapsed_s": round(time.time() - t0, 2),
    }
    write_meta(out, meta)
    meta = read_meta(out)
    n = sum(counts["crops"].values())
    secs = sum(counts["seconds"].values())
    log.info("wrote %s: %d crops (%.1f s of audio) from %d/%d sources, %d skipped, layout %s, %.0f tokens/s, "
             "vocab %d, max_len %d", out, n, secs, counts["sources_used"], len(items), counts["num_skipped"],
             cfg.layout, spec["tokens_per_second"], len(tok), max_len)
    return meta


# --------------------------------------------------------------------------------------------------- CLI


def add_audio_args(ap: argparse.ArgumentParser) -> None:
    """The audio flags (also used by ``data_preprocess.preprocess --mode audio``). Defaults come from
    :class:`AudioPrepConfig`; flags not given keep the ``--config`` file's values."""
    S = argparse.SUPPRESS
    ap.add_argument("--config", default=S, help="YAML/JSON file with AudioPrepConfig fields")
    ap.add_argument("-t", "--tokenizer", default=S)
    ap.add_argument("-i", "--input", default=S)
    ap.add_argument("-o", "--output_dir", default=S)
    ap.add_argument("--codec", default=S)
    ap.add_argument("--layout", choices=LAYOUTS, default=S)
    ap.add_argument("--bandwidth", type=float, default=S)
    ap.add_argument("--crop_seconds", type=float, default=S)
    ap.add_argument("--min_crop_seconds", type=float, default=S)
    ap.add_argument("--max_crops_per_file", type=int, default=S)
    ap.add_argument("--caption_dropout", type=float, default=S)
    ap.add_argument("--max_caption_tokens", type=int, default=S)
    ap.add_argument("--caption_field", default=S)
    ap.add_argument("--audio_field", default=S)
    ap.add_argument("--dataset_split", default=S)
    ap.add_argument("--max_len", type=int, default=S)
    ap.add_argument("--val_ratio", type=float, default=S)
    ap.add_argument("--seed", type=int, default=S)
    ap.add_argument("--limit", type=int, default=S)
    ap.add_argument("-w", "--workers", type=int, default=S)
    ap.add_argument("--batch_size", type=int, default=S)
    ap.add_argument("--device", default=S)
    ap.add_argument("--overwrite", action="store_true", default=S)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of AudioPrepConfig fields")


def maybe_run_from_preprocess(argv=None) -> int | None:
    """Hook for ``data_preprocess.preprocess``: runs this tool and returns its exit code when the command
    line says ``--mode audio``; returns None (nothing done) for every other mode."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mode_ap = argparse.ArgumentParser(add_help=False)
    mode_ap.add_argument("--mode")
    ns, rest = mode_ap.parse_known_args(argv)
    if ns.mode != "audio":
        return None
    return main(rest)


@exit_on_argument_error
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m data_preprocess.audio", description=__doc__.split("\n")[0])
    add_audio_args(ap)
    meta = run_audio(build(AudioPrepConfig, ap, argv))
    print(json.dumps({k: meta[k] for k in ("mode", "max_len", "vocab_size", "splits", "counts")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

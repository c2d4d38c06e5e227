"""ABC corpus ingest: read tunes from any source, split, normalise, validate, deduplicate, stream.

Sources (``iter_tunes(source)``):

* ``"music21"`` — the ABC corpus bundled with music21 (≈ 12,978 tunes in 1,146 files, offline);
* a directory — every ``*.abc`` / ``*.txt`` file below it (sorted, so the order is reproducible);
* a single ``.abc`` / ``.txt`` file;
* a ``.jsonl`` file — one JSON object per line, the tune text in ``text_field`` (default ``text``);
* a ``datasets`` dataset — a ``save_to_disk`` directory, a local ``.parquet`` / ``.csv`` / ``.arrow``
  file, or a hub id (``owner/name``; needs the network, so it fails with a clear message offline).

Every text is cut into tunes at ``X:`` lines. Text before the first ``X:`` of a file (the ABC "file
header": comments, ``%%`` directives, prose) is skipped unless it carries a ``K:`` field; a text with no
``X:`` at all is treated as one tune (so a JSONL record holding a tune without ``X:`` still works).

Normalisation (what training sees):

* line endings CRLF / CR -> LF; trailing spaces and tabs removed; C0 control characters removed;
* ``%`` comment lines removed, but ``%%`` directives kept (``%%MIDI program``, ``%%score`` … change how
  the tune plays or engraves, so they are part of the music);  comments at the end of a music line are
  kept (``\\%`` escapes make removing them unsafe);
* runs of blank lines collapsed to one, leading / trailing blank lines removed, text ends with one LF.

Validation (a rejected tune is counted under its reason and reported via ``on_reject``; nothing valid
is dropped): ``undecodable`` (more than 1 % of characters replaced/control, i.e. binary), ``line_too_long``
(a line longer than ``max_line_len``), ``no_key`` (no ``K:`` field), ``no_body`` (nothing after ``K:``
that looks like music), plus for JSONL ``bad_json`` / ``no_text_field``. Bytes are decoded as UTF-8; a
tune that is not valid UTF-8 but has no valid multi-byte sequence is decoded as cp1252 (old
collections are often Latin-1), otherwise invalid bytes become U+FFFD and are counted.

Duplicates: the hash of the *music* (the ``K:``/``M:``/``L:`` values plus the body after ``K:`` with
all whitespace removed), not of the title or ``X:`` number; only the 16-byte digests are kept, so
memory stays flat while the corpus streams through.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_preprocess.abctools import abc_to_midi
from data_preprocess.hub import ArgumentError

MUSIC21 = "music21"
ABC_SUFFIXES = (".abc", ".txt")
TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".ndjson")  # --content text: a dir's documents
DATASET_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".json": "json"}
DEFAULT_MAX_LINE_LEN = 4096
MAX_BAD_FRACTION = 0.01           # > 1 % replaced/control characters -> "undecodable"
READ_BLOCK = 8 << 20              # file read size (streaming: memory is O(block + one tune))
MAX_SEGMENT_BYTES = 32 << 20      # one "tune" larger than this is garbage: cut and rejected
MAX_RECORD_BYTES = 8 << 20        # one JSONL line (one example) larger than this is rejected unread: a JSON
                                  # record is decoded whole, so its size bounds memory (~10x while checked)

REJECT_REASONS = ("bad_json", "bad_record", "no_text_field", "undecodable", "line_too_long", "no_key", "no_body", "abc2midi")

# header field letter -> Tune.meta key (ABC 2.1 information fields)
FIELDS = {
    "X": "ref", "T": "title", "M": "meter", "L": "unit", "Q": "tempo", "K": "key", "R": "rhythm",
    "O": "origin", "S": "source", "Z": "transcription", "C": "composer", "A": "area", "B": "book",
    "D": "discography", "F": "file_url", "G": "group", "H": "history", "N": "notes", "P": "parts",
}

_TUNE_START_B = re.compile(rb"\nX:")           # (bytes: CR already turned into LF) match start + 1
_TUNE_START_S = re.compile(r"(?m)^X:")
_HAS_KEY_B = re.compile(rb"(?m)^K:")
_HAS_KEY_S = re.compile(r"(?m)^K:")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_COMMENT_LINE = re.compile(r"(?m)^%(?!%)[^\n]*(?:\n|$)")
_KEY_LINE = re.compile(r"(?m)^K:[^\n]*(?:\n|$)")
_FIELD_LINE = re.compile(r"(?m)^([A-Za-z]):[ \t]*([^\n%]*)")
_MUSIC_LINE = re.compile(r"(?m)^(?![A-Za-z]:|%)[^\n]*[A-Ga-gzx]")   # a non-field line with a note/rest


@dataclass
class Tune:
    """One normalised, valid tune. ``file``/``index`` locate it (for JSONL ``file`` is ``path:line``)."""

    text: str
    meta: dict
    file: str
    index: int
    body_hash: str               # hex digest of the music (dedup key, split key)
    bad_chars: int = 0           # characters replaced while decoding (U+FFFD / controls removed)

    @property
    def body(self) -> str:
        m = _KEY_LINE.search(self.text)
        return self.text[m.end():] if m else ""


@dataclass
class Reject:
    file: str
    index: int
    reason: str
    detail: str = ""

    def to_json(self) -> dict:
        return {"file": self.file, "index": self.index, "reason": self.reason, "detail": self.detail}


@dataclass
class CorpusStats:
    """Counters filled while a corpus streams through :func:`iter_tunes`."""

    files: int = 0
    empty_files: int = 0
    bytes_read: int = 0
    tunes_read: int = 0          # candidate tunes seen (valid + rejected + duplicates)
    kept: int = 0
    duplicates: int = 0
    other_parts: int = 0         # kept by the other parts of a --num_shards run
    rejected: Counter = field(default_factory=Counter)
    replaced_chars: int = 0      # U+FFFD / control characters in kept tunes
    recoded_cp1252: int = 0      # tunes decoded as cp1252 because they were not UTF-8

    def reject(self, r: Reject, on_reject: Callable[[Reject], None] | None) -> None:
        self.rejected[r.reason] += 1
        if on_reject is not None:
            on_reject(r)

    def to_json(self) -> dict:
        return {"files": self.files, "empty_files": self.empty_files, "bytes_read": self.bytes_read,
                "tunes_read": self.tunes_read, "kept": self.kept, "duplicates": self.duplicates,
                "other_parts": self.other_parts,
                "rejected": dict(sorted(self.rejected.items())), "rejected_total": sum(self.rejected.values()),
                "replaced_chars": self.replaced_chars, "recoded_cp1252": self.recoded_cp1252}


# ------------------------------------------------------------------------------------------ text level


def decode_bytes(b: bytes) -> tuple[str, int, bool]:
    """UTF-8, else cp1252 for legacy 8-bit text, else UTF-8 with replacement.
    Returns (text, number of replaced characters, recoded_as_cp1252)."""
    try:
        return b.decode("utf-8"), 0, False
    except UnicodeDecodeError:
        pass
    t = b.decode("utf-8", errors="replace")
    if not any(ord(c) > 0x7F and c != "\ufffd" for c in t):   # no valid multi-byte sequence: legacy text
        t2 = b.decode("cp1252", errors="replace")
        return t2, t2.count("\ufffd"), True
    return t, t.count("\ufffd"), False


def normalise(text: str) -> tuple[str, int]:
    """Normalises one tune's text (see module doc). Returns (text, control characters removed)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    n_ctrl = 0
    if _CONTROL.search(text):
        text, n_ctrl = _CONTROL.subn("", text)
    if "%" in text:
        text = _COMMENT_LINE.sub("", text)
    # (str methods, not regexes: this runs on every byte of the corpus, and they are ~5x faster here)
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    while "\n\n\n" in text:                # runs of blank lines -> one blank line
        text = text.replace("\n\n\n", "\n\n")
    text = text.strip("\n")
    return (text + "\n" if text else ""), n_ctrl


def parse_meta(text: str) -> tuple[dict, str | None]:
    """Header fields up to and including the first ``K:`` line -> (meta, body or None without K:).
    A trailing ``% comment`` on a header line is not part of the value."""
    km = _KEY_LINE.search(text)
    header = text[:km.end()] if km else text
    meta: dict = {}
    for letter, value in _FIELD_LINE.findall(header):
        key = FIELDS.get(letter)
        value = value.strip()
        if key is None or not value:
            continue
        if key == "title":
            meta.setdefault("titles", []).append(value)
        if key not in meta:
            meta[key] = value
        elif key in ("notes", "history", "transcription", "source", "composer"):
            meta[key] += "; " + value
    return meta, (text[km.end():] if km else None)


def music_hash(meta: dict, body: str) -> str:
    """The dedup key: key/meter/unit plus the body without whitespace (title and X: number excluded)."""
    squeezed = body.replace(" ", "").replace("\n", "").replace("\t", "")
    h = hashlib.blake2b(f"{meta.get('key', '')}|{meta.get('meter', '')}|{meta.get('unit', '')}|".encode(),
                        digest_size=16)
    h.update(squeezed.encode("utf-8", errors="surrogatepass"))
    return h.hexdigest()


def split_hash(body_hash: str, seed: int = 0) -> float:
    """A tune's (or record's) uniform draw in [0, 1) that decides its split."""
    h = hashlib.blake2b(f"{seed}:{body_hash}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def part_of(key: str, num_parts: int) -> int:
    """The part (0 .. num_parts-1) of ``preprocess --num_shards`` a tune or record belongs to: a hash of its
    dedup key, so duplicates meet in one part (dedup within a part is dedup of the whole corpus), salted
    apart from :func:`split_hash` so every part gets the corpus's share of val."""
    if num_parts <= 1:
        return 0
    h = hashlib.blake2b(f"part:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % num_parts


def reject_part(r: Reject, num_parts: int) -> int:
    """The one part that reports a rejected tune (every part reads the whole input)."""
    return part_of(f"{r.file}:{r.index}", num_parts)


def split_of(body_hash: str, val_ratio: float, seed: int = 0) -> str:
    """Deterministic train/val assignment from the tune's music hash: a tune keeps its split when the
    corpus grows or is reordered."""
    return split_from_hash(split_hash(body_hash, seed), val_ratio)


def split_from_hash(h: float, val_ratio: float) -> str:
    """:func:`split_of` for an already drawn :func:`split_hash` ``h`` (in [0, 1): val_ratio 0 sends nothing to val)."""
    return "val" if h < val_ratio else "train"


def check_tune(raw: str, file: str, index: int, max_line_len: int = DEFAULT_MAX_LINE_LEN,
               bad_chars: int = 0) -> Tune | Reject:
    """Normalises and validates one raw tune text."""
    text, n_ctrl = normalise(raw)
    bad = bad_chars + n_ctrl
    if bad and bad > MAX_BAD_FRACTION * max(len(raw), 1):
        return Reject(file, index, "undecodable", f"{bad} of {len(raw)} characters undecodable/control (binary data?)")
    return validate(text, file, index, max_line_len, bad)


def validate(text: str, file: str, index: int, max_line_len: int = DEFAULT_MAX_LINE_LEN,
             bad: int = 0, check_lines: bool = True) -> Tune | Reject:
    """Validates one already-normalised tune text."""
    if check_lines:
        longest = max(map(len, text.split("\n"))) if text else 0
        if longest > max_line_len:
            return Reject(file, index, "line_too_long", f"a line of {longest} characters (limit {max_line_len})")
    meta, body = parse_meta(text)
    if body is None:
        first = text.split("\n", 1)[0][:60]
        return Reject(file, index, "no_key", f"no K: field (starts {first!r})")
    if not _MUSIC_LINE.search(body):
        return Reject(file, index, "no_body", f"nothing after K:{meta.get('key', '')} looks like music")
    return Tune(text, meta, file, index, music_hash(meta, body), bad)


# ------------------------------------------------------------------------------------------ readers


def split_text(text: str, at_start: bool = True, whole: bool = True) -> list[str]:
    """Cuts a string into tune texts at ``X:`` lines. The part before the first ``X:`` (the file
    header) is kept only if it has a ``K:`` field, or if there is no ``X:`` at all (then the whole text
    is one tune)."""
    starts = [m.start() for m in _TUNE_START_S.finditer(text)]
    if not starts:   # a whole text without X: is one tune; a file-header block only if it has K:
        return [text] if text.strip() and (whole or _HAS_KEY_S.search(text)) else []
    parts = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    head = text[:starts[0]]
    if at_start and head.strip() and _HAS_KEY_S.search(head):
        parts.insert(0, head)
    return parts


def _split_bytes(block: bytes, at_start: bool, whole: bool) -> list[bytes]:
    starts = [m.start() + 1 for m in _TUNE_START_B.finditer(block)]
    if block.startswith(b"X:"):
        starts.insert(0, 0)
    if not starts:
        return [block] if block.strip() and (whole or _HAS_KEY_B.search(block)) else []
    parts = [block[a:b] for a, b in zip(starts, starts[1:] + [len(block)])]
    head = block[:starts[0]]
    if at_start and head.strip() and _HAS_KEY_B.search(head):
        parts.insert(0, head)
    return parts


def _file_blocks(path: Path, stats: CorpusStats) -> Iterator[tuple[bytes, bool, bool, bool]]:
    """Streams a file as blocks of whole tunes (cut before an ``X:`` line), reading 8 MB at a time, so
    memory is one block plus one tune whatever the file size. CR / CRLF become LF here. Yields
    (block, at_file_start, oversize, whole_file); an oversize block is one tune larger than ``MAX_SEGMENT_BYTES``
    (garbage; only its start is kept, to be rejected)."""
    buf = b""
    at_start, oversize = True, False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_BLOCK)
            eof = not chunk
            if chunk.endswith(b"\r"):
                chunk += f.read(1)          # never split a CRLF pair between two chunks
            stats.bytes_read += len(chunk)
            if b"\r" in chunk:
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            buf += chunk
            cut = len(buf) if eof else buf.rfind(b"\nX:") + 1   # whole tunes end before the last X:
            if cut > 0 and oversize:
                first = buf.find(b"\nX:") + 1 or len(buf)
                yield buf[:first], at_start, True, False
                buf, cut, at_start, oversize = buf[first:], cut - first, False, False
            if cut > 0:
                yield buf[:cut], at_start, False, at_start and eof
                buf, at_start = buf[cut:], False
            if eof:
                return
            if len(buf) > MAX_SEGMENT_BYTES:      # no real tune is this big: keep its start, flag it
                buf, oversize = buf[:4096], True


def _iter_checked(source: str, text_field: str, stats: CorpusStats, max_line_len: int) -> Iterator[Tune | Reject]:
    """Yields a validated :class:`Tune` or a :class:`Reject` for every candidate tune of ``source``."""
    src = str(source)
    p = Path(src).expanduser()
    if src == MUSIC21:
        from music21 import corpus as m21corpus

        files = sorted(Path(x) for x in m21corpus.getPaths(fileExtensions=("abc",)))
        if not files:
            raise ArgumentError("music21: its bundled corpus has no ABC files (music21 installed without corpus?)")
        yield from _iter_files(files, stats, max_line_len)
    elif p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file()
                         or (p / "dataset_dict.json").is_file()):
        yield from _iter_dataset(src, text_field, stats, max_line_len)
    elif p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.is_file() and x.suffix.lower() in ABC_SUFFIXES)
        if not files:
            raise ArgumentError(f"{p}: no .abc or .txt files below this directory")
        yield from _iter_files(files, stats, max_line_len)
    elif p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(p, text_field, stats, max_line_len)
    elif p.is_file() and p.suffix.lower() in DATASET_SUFFIXES:
        yield from _iter_dataset(src, text_field, stats, max_line_len)
    elif p.is_file():
        yield from _iter_files([p], stats, max_line_len)
    elif p.exists():
        raise ArgumentError(f"{p}: not a regular file or directory")
    elif "/" in src and not src.startswith((".", "/", "~")):
        yield from _iter_dataset(src, text_field, stats, max_line_len)      # a hub id
    else:
        raise ArgumentError(f"{src}: no such file or directory (expected a dir of .abc/.txt, a .jsonl, "
                         "a datasets dir / hub id, or 'music21')")


def _iter_files(files: Iterable[Path], stats: CorpusStats, max_line_len: int) -> Iterator[Tune | Reject]:
    """Fast path per block: valid UTF-8 without control characters is normalised as a whole and then
    cut into tunes (normalisation is line-local, so this equals per-tune normalisation); anything
    else goes tune by tune through :func:`decode_bytes` / :func:`check_tune`."""
    for path in files:
        stats.files += 1
        file, n = str(path), 0
        for block, at_start, oversize, whole in _unless_unreadable(_file_blocks(path, stats), path):
            if oversize:
                yield Reject(file, n, "line_too_long", f"one tune larger than {MAX_SEGMENT_BYTES >> 20} MB")
                n += 1
                continue
            try:
                text = block.decode("utf-8")
                fast = not _CONTROL.search(text)
            except UnicodeDecodeError:
                fast = False
            if fast:
                text, _ = normalise(text)
                long_lines = max(map(len, text.split("\n"))) > max_line_len
                for part in split_text(text, at_start, whole):
                    part = part.strip("\n")
                    if part:
                        yield validate(part + "\n", file, n, max_line_len, 0, check_lines=long_lines)
                        n += 1
            else:
                for seg in _split_bytes(block, at_start, whole):
                    raw, bad, recoded = decode_bytes(seg)
                    stats.recoded_cp1252 += recoded
                    if raw.strip():
                        yield check_tune(raw, file, n, max_line_len, bad)
                        n += 1
        if n == 0:
            stats.empty_files += 1


def _unless_unreadable(it: Iterator, path: Path) -> Iterator:
    """``it`` with an OSError while reading ``path`` (no permission, I/O error) turned into a one-line
    :class:`ArgumentError` naming the file."""
    try:
        yield from it
    except OSError as e:
        raise ArgumentError(f"input {path}: cannot be read ({e.strerror or type(e).__name__}). Fix: make it readable "
                            "or leave it out of -i") from None


def _iter_texts(text: str, file: str, max_line_len: int) -> Iterator[Tune | Reject]:
    for i, part in enumerate(split_text(text)):
        yield check_tune(part, file, i, max_line_len, part.count("\ufffd"))


def iter_jsonl(path: Path, stats: CorpusStats) -> Iterator[tuple[str, int, object]]:
    """Yields ``(where, lineno, record)`` for each non-blank line of a JSONL file, or ``(where, lineno,
    Reject)`` for a line that is not valid JSON (named ``file:line``); counts the file and its bytes."""
    stats.files += 1
    with _unless_unreadable_open(path) as f:
        for lineno, line, size in _unless_unreadable(_capped_lines(f, MAX_RECORD_BYTES), path):
            stats.bytes_read += size
            where = f"{path}:{lineno}"
            if line is None:
                yield where, lineno, Reject(where, 0, "line_too_long", f"a JSONL record of {size} bytes (limit "
                                                                         f"{MAX_RECORD_BYTES >> 20} MB)")
                continue
            if not line.strip():
                continue
            try:
                yield where, lineno, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield where, lineno, Reject(where, 0, "bad_json", f"invalid JSON: {str(e)[:120]}")


def _unless_unreadable_open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise ArgumentError(f"input {path}: cannot be opened ({e.strerror or type(e).__name__}). Fix: make it "
                            "readable or pass another -i") from None


def _capped_lines(f, cap: int) -> Iterator[tuple[int, bytes | None, int]]:
    """``(lineno, line, size)`` for each line of binary file ``f``; a line over ``cap`` bytes is skipped in 1 MB
    reads (``line`` None), never held in memory."""
    lineno = 0
    while True:
        line = f.readline(cap + 1)
        if not line:
            return
        lineno += 1
        if len(line) <= cap or line.endswith(b"\n"):
            yield lineno, line, len(line)
            continue
        size = len(line)
        while line and not line.endswith(b"\n"):
            line = f.readline(1 << 20)
            size += len(line)
        yield lineno, None, size


def _jsonl_texts(path: Path, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str] | Reject]:
    """``(text, where)`` of each JSONL record's ``text_field``, or a Reject for a record without one."""
    for where, _, rec in iter_jsonl(path, stats):
        if isinstance(rec, Reject):
            yield rec
            continue
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            yield Reject(where, 0, "no_text_field", f"no string field '{text_field}' (use --text_field)")
            continue
        yield text, where


def _iter_jsonl(path: Path, text_field: str, stats: CorpusStats, max_line_len: int) -> Iterator[Tune | Reject]:
    for r in _jsonl_texts(path, text_field, stats):
        if isinstance(r, Reject):
            yield r
        else:
            yield from _iter_texts(*r, max_line_len)


def load_hf_dataset(source: str):
    """A ``datasets`` Dataset from a save_to_disk dir, a local data file, or a hub id (train split)."""
    import datasets

    p = Path(source).expanduser()
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
        elif p.is_file():
            ds = datasets.load_dataset(DATASET_SUFFIXES[p.suffix.lower()], data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types; we add what to do
        raise ArgumentError(f"{source}: could not load as a datasets dataset ({type(e).__name__}: {e}); "
                         "offline, pass a local save_to_disk dir, .parquet/.csv/.arrow file or .jsonl") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else datasets.concatenate_datasets(list(ds.values()))
    return ds


def _dataset_texts(source: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str] | Reject]:
    """``(text, where)`` of each row's ``text_field`` of a datasets dataset, or a Reject for a non-string one."""
    ds = load_hf_dataset(source)
    if text_field not in ds.column_names:
        raise ArgumentError(f"{source}: no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
                         "pass --text_field")
    stats.files += 1
    ds = ds.select_columns([text_field])
    row = 0
    for batch in ds.iter(batch_size=1000):           # arrow-backed: only one batch in RAM
        for text in batch[text_field]:
            where = f"{source}[{row}]"
            row += 1
            if not isinstance(text, str):
                yield Reject(where, 0, "no_text_field", f"field '{text_field}' is {type(text).__name__}")
                continue
            stats.bytes_read += len(text)
            yield text, where


def _iter_dataset(source: str, text_field: str, stats: CorpusStats, max_line_len: int) -> Iterator[Tune | Reject]:
    for r in _dataset_texts(source, text_field, stats):
        if isinstance(r, Reject):
            yield r
        else:
            yield from _iter_texts(*r, max_line_len)


# ------------------------------------------------------------------------------------------ plain text


def check_document(raw: str, file: str, index: int, bad_chars: int = 0) -> Tune | Reject:
    """One plain-text document (``--content text``: general text mixed into pretraining, as MusicPile mixes
    it with ABC): line ends made LF, control characters removed, nothing else changed; ``meta`` is empty and
    the dedup / split key is a hash of the whole text."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n") if "\r" in raw else raw
    n_ctrl = 0
    if _CONTROL.search(text):
        text, n_ctrl = _CONTROL.subn("", text)
    bad = bad_chars + n_ctrl
    if bad and bad > MAX_BAD_FRACTION * max(len(raw), 1):
        return Reject(file, index, "undecodable", f"{bad} of {len(raw)} characters undecodable/control (binary data?)")
    text = text.strip("\n")
    if not text.strip():
        return Reject(file, index, "empty", "no text")
    key = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).hexdigest()
    return Tune(text + "\n", {}, file, index, key, bad)


def _iter_documents(source: str, text_field: str, stats: CorpusStats) -> Iterator[Tune | Reject]:
    """The documents of a plain-text source: each ``text_field`` of a JSONL file or datasets dataset, each
    .txt/.md file (one document per file), or those below a directory."""
    src = str(source)
    p = Path(src).expanduser()
    if src == MUSIC21:
        raise ArgumentError("--content text reads plain text, but music21 is an ABC corpus. Fix: --content abc, "
                            "or -i a .jsonl / dir of .txt files / datasets dir of general text")
    if p.is_dir() and not any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        files = sorted(x for x in p.rglob("*") if x.is_file() and x.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ArgumentError(f"input {p}: no {'/'.join(TEXT_SUFFIXES)} files below this directory. Fix: -i a dir "
                                "of text files, a .jsonl or a datasets dir")
    elif p.exists() or ("/" in src and not src.startswith((".", "/", "~"))):  # a file, datasets dir or hub id
        files = [p] if p.is_file() and p.suffix.lower() not in DATASET_SUFFIXES else None
    else:
        raise ArgumentError(f"input {src}: no such file or directory. Fix: -i a .jsonl, a dir of .txt files or a "
                            "datasets dir / hub id")
    def documents(records):  # one document per record
        for r in records:
            yield r if isinstance(r, Reject) else check_document(r[0], r[1], 0, r[0].count("\ufffd"))

    if files is None:  # a datasets dir, data file or hub id
        yield from documents(_dataset_texts(src, text_field, stats))
        return
    for path in files:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            yield from documents(_jsonl_texts(path, text_field, stats))
            continue
        stats.files += 1
        size = path.stat().st_size
        stats.bytes_read += size
        if size > MAX_SEGMENT_BYTES:
            yield Reject(str(path), 0, "line_too_long", f"a text file of {size >> 20} MB (limit "
                                                        f"{MAX_SEGMENT_BYTES >> 20} MB per document): split it")
            continue
        with _unless_unreadable_open(path) as f:
            text, bad, recoded = decode_bytes(f.read())
        stats.recoded_cp1252 += recoded
        yield check_document(text, str(path), 0, bad)


def iter_tunes(source: str, text_field: str = "text", *, stats: CorpusStats | None = None,
               on_reject: Callable[[Reject], None] | None = None, dedup: bool = True,
               limit: int | None = None, max_line_len: int = DEFAULT_MAX_LINE_LEN,
               part: tuple[int, int] = (0, 1), content: str = "abc") -> Iterator[Tune]:
    """Streams the valid, normalised, (by default) deduplicated tunes of ``source`` (``content="text"``: its
    plain-text documents, :func:`check_document`).

    ``stats`` (a :class:`CorpusStats`) is filled as it goes; ``on_reject`` is called with each
    :class:`Reject`; ``limit`` stops after that many kept tunes. ``part=(i, n)``: only the tunes of part
    ``i`` of ``n`` (:func:`part_of`; the others count as ``other_parts``, their rejects are another part's).
    """
    index, parts = part
    stats = stats if stats is not None else CorpusStats()
    seen: set[bytes] = set()
    items = (_iter_documents(source, text_field, stats) if content == "text"
             else _iter_checked(source, text_field, stats, max_line_len))
    for r in items:
        if isinstance(r, Reject):
            if parts > 1 and reject_part(r, parts) != index:
                continue
            stats.tunes_read += 1
            stats.reject(r, on_reject)
            continue
        if parts > 1 and part_of(r.body_hash, parts) != index:
            stats.other_parts += 1
            continue
        stats.tunes_read += 1
        if dedup:
            key = bytes.fromhex(r.body_hash)
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
        stats.kept += 1
        stats.replaced_chars += r.bad_chars
        yield r
        if limit is not None and stats.kept >= limit:
            return


# ------------------------------------------------------------------------------------------ abc2midi


def abc2midi_problem(text: str, timeout: float = 20.0) -> str | None:
    """Runs the real ``abc2midi`` on one tune; returns why it fails (no MIDI written, or errors), or None.
    Warnings are tolerated: most real-world tunes produce some."""
    r = abc_to_midi(text, timeout=timeout)
    if r.timed_out:
        return f"abc2midi timed out after {timeout:g} s"
    if not r.ok:
        return "abc2midi wrote no MIDI: " + ("; ".join(r.errors[:3]) or r.log.strip()[-200:] or f"rc={r.returncode}")
    if r.errors:
        return "abc2midi errors: " + "; ".join(r.errors[:3])
    return None

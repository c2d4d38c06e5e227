"""SFT data: conversations from JSONL records or from ABC metadata, tokenised in the model's chat format.

The format, the tokenisation and the loss mask (1 on the assistant answers and their end-of-turn token only) are
:mod:`data_preprocess.chat_format`'s: the tokenizer's own chat template (e.g. SmolLM2's ChatML), else ChatMusician's
``<s>Human: {prompt} </s> Assistant: {answer} </s> `` -- the ids equal ``tokenizer.apply_chat_template`` of the
conversation, so training sees what inference feeds the model. The loss mask is the shard format's ``loss_mask``
(labels = -100 where 0).

``metadata_conversations(tune)`` turns one ABC tune into a text->music instruction ("Compose a jig in
D major titled ...") and a music->text one (tune -> key / meter / rhythm description). Templates are
picked by the tune's music hash, so the set is deterministic and varied without any RNG.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_preprocess.abc_meter import MODE_NAMES, MODES
from data_preprocess.corpus import (
    CorpusStats,
    Reject,
    Tune,
    iter_jsonl,
    load_hf_dataset,
    part_of,
    reject_part,
)

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    turns: list[tuple[str, str]]     # (role, content), role in ROLES
    file: str
    index: int
    kind: str = "record"             # record | text2music | music2text

    @property
    def key(self) -> str:
        """Content hash: dedup and train/val split key."""
        h = hashlib.blake2b(digest_size=16)
        for role, content in self.turns:
            h.update(role.encode() + b"\x00" + content.encode("utf-8", "surrogatepass") + b"\x01")
        return h.hexdigest()

    @property
    def messages(self) -> list[dict]:
        """The turns as chat messages (``[{"role", "content"}]``), what :class:`~data_preprocess.chat_format.ChatFormat`
        encodes."""
        return [{"role": r, "content": c} for r, c in self.turns]


# ------------------------------------------------------------------------------------ records (JSONL)


def record_to_turns(rec) -> list[tuple[str, str]] | str:
    """``{"instruction","input","output"}`` or ``{"messages":[{"role","content"}...]}`` -> turns, or
    the reason it is unusable (a string)."""
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' is not a non-empty list"
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"messages[{i}] has no string 'content'"
            role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(m.get("role"), m.get("role"))
            if role not in ROLES:
                return f"messages[{i}].role {m.get('role')!r} is not one of {ROLES}"
            turns.append((role, m["content"]))
        if not any(r == "assistant" for r, _ in turns):
            return "no assistant message (nothing to learn)"
        return turns
    if isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):
        prompt = rec["instruction"]
        extra = rec.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n{extra}" if prompt.strip() else extra
        return [("user", prompt), ("assistant", rec["output"])]
    return "expected {'instruction','input','output'} or {'messages':[...]}"


def iter_sft_records(source: str, stats: CorpusStats, on_reject=None, limit: int | None = None,
                     dedup: bool = True, part: tuple[int, int] = (0, 1)) -> Iterator[Conversation]:
    """Streams conversations from a JSONL file (or a datasets dataset with the same columns).
    Bad lines are rejected (``bad_json`` / ``bad_record``) with file:line, never fatal. ``part=(i, n)``:
    only part ``i`` of ``n`` (``corpus.part_of`` the record's key), as :func:`corpus.iter_tunes`."""
    seen: set[bytes] = set()
    index, parts = part

    def reject(r: Reject):
        if parts <= 1 or reject_part(r, parts) == index:
            stats.tunes_read += 1
            stats.reject(r, on_reject)

    def emit(turns_or_reason, where: str, row: int):
        if isinstance(turns_or_reason, str):
            reject(Reject(where, 0, "bad_record", turns_or_reason))
            return None
        conv = Conversation(turns_or_reason, where, row)
        if parts > 1 and part_of(conv.key, parts) != index:
            stats.other_parts += 1
            return None
        stats.tunes_read += 1
        k = bytes.fromhex(conv.key)
        if dedup and k in seen:
            stats.duplicates += 1
            return None
        seen.add(k)
        stats.kept += 1
        return conv

    p = Path(source)
    if p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson"):
        for where, lineno, rec in iter_jsonl(p, stats):
            if isinstance(rec, Reject):
                reject(rec)
                continue
            conv = emit(record_to_turns(rec), where, lineno)
            if conv is not None:
                yield conv
                if limit is not None and stats.kept >= limit:
                    return
    else:
        ds = load_hf_dataset(source)
        stats.files += 1
        for row, rec in enumerate(ds):
            conv = emit(record_to_turns(rec), f"{source}[{row}]", row)
            if conv is not None:
                yield conv
                if limit is not None and stats.kept >= limit:
                    return


# ------------------------------------------------------------------------------------ from metadata

_KEY_RE = re.compile(r"^\s*([A-Ga-g])\s*([#b♯♭]?)\s*([A-Za-z]*)")


def describe_key(k: str | None) -> str | None:
    """``"Dmix"`` -> ``"D mixolydian"``, ``"F#m"`` -> ``"F sharp minor"``, ``"none"``/``"HP"`` -> None."""
    if not k:
        return None
    m = _KEY_RE.match(k)
    if not m or k.strip().lower().startswith(("none", "hp")):
        return None
    tonic = m.group(1).upper() + {"#": " sharp", "♯": " sharp", "b": " flat", "♭": " flat"}.get(m.group(2), "")
    word = m.group(3).lower()
    mode = MODE_NAMES.get(MODES.get(word[:3] if word[:3] in MODES else word, ""))
    if mode is None:                  # "clef=bass", "treble" ... : not a mode word
        mode = "minor" if word in ("m",) else "major"
    return f"{tonic} {mode}"


def describe_meter(m: str | None) -> str | None:
    if not m:
        return None
    m = m.strip()
    return {"C": "4/4", "C|": "2/2"}.get(m, m) if m.lower() != "none" else None


def _clean(s: str | None) -> str | None:
    if not s:
        return None
    s = re.sub(r"\s+", " ", s).strip().strip(".,;").strip()
    return s or None


def with_article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


# text -> music: (template, required fields). Fields: title, key, meter, rhythm, origin.
T2M = [
    ("Compose {a_rhythm} in {key} titled \"{title}\".", ("rhythm", "key", "title")),
    ("Write a tune in {key}, in {meter} time, called \"{title}\".", ("key", "meter", "title")),
    ("Create {a_rhythm} in ABC notation. Key: {key}. Meter: {meter}.", ("rhythm", "key", "meter")),
    ("Here is a title: \"{title}\". Write a melody in ABC notation that fits it.", ("title",)),
    ("Compose a melody in {key} in the {origin} tradition.", ("key", "origin")),
    ("Write an ABC tune in {meter} time in the key of {key}.", ("key", "meter")),
    ("Compose a short piece of music in ABC notation in {key}.", ("key",)),
]
# music -> text prompts
M2T = [
    "Describe the key, meter and rhythm of this tune.\n{abc}",
    "What key and time signature is the following ABC tune in? What kind of tune is it?\n{abc}",
    "Analyse this piece of music written in ABC notation: give its key, meter and style.\n{abc}",
]
_STRIP_FOR_M2T = re.compile(r"(?m)^[TR]:[^\n]*\n")   # the title / rhythm would give the answer away


def tune_fields(t: Tune) -> dict:
    m = t.meta
    rhythm = _clean(m.get("rhythm"))
    return {"title": _clean(m.get("title")), "key": describe_key(m.get("key")),
            "meter": describe_meter(m.get("meter")), "rhythm": rhythm.lower() if rhythm else None,
            "origin": _clean(m.get("origin")), "unit": _clean(m.get("unit"))}


def music_description(f: dict) -> str | None:
    parts = []
    if f["rhythm"]:
        parts.append(f"It is {with_article(f['rhythm'])}")
    if f["meter"]:
        parts.append(("in" if parts else "It is in") + f" {f['meter']} time")
    if f["key"]:
        parts.append(("in" if parts else "It is in") + f" {f['key']}")
    if not parts:
        return None
    s = ", ".join(parts)
    if f["unit"]:
        s += f", with a default note length of {f['unit']}"
    if f["origin"]:
        s += f". Origin: {f['origin']}"
    return s + "."


def metadata_conversations(t: Tune, music2text_fraction: float = 1.0) -> list[Conversation]:
    """Up to two conversations per tune: text->music and music->text (when the metadata allows). Only a
    ``music2text_fraction`` of the tunes (chosen by their body hash, so the choice is stable) also give a
    music->text one: its answers are short and formulaic, and at 1:1 a short SFT learns to answer "write a
    tune" with a description (seen on the default job at 96 examples)."""
    f = tune_fields(t)
    pick = int(t.body_hash[:8], 16)
    out = []
    vals = {**f, "a_rhythm": with_article(f["rhythm"]) if f["rhythm"] else None}
    cands = [tpl for tpl, req in T2M if all(f[r] for r in req)]
    if cands:
        prompt = cands[pick % len(cands)].format(**vals)
        out.append(Conversation([("user", prompt), ("assistant", t.text.rstrip("\n"))], t.file, t.index, "text2music"))
    desc = music_description(f)
    if desc and ((pick >> 16) % 1000) < round(music2text_fraction * 1000):
        abc = _STRIP_FOR_M2T.sub("", t.text).rstrip("\n")
        prompt = M2T[(pick >> 8) % len(M2T)].format(abc=abc)
        out.append(Conversation([("user", prompt), ("assistant", desc)], t.file, t.index, "music2text"))
    return out

"""Find the ABC tunes inside a model reply (or any free text).

A chat model's reply may hold one tune, several, none, a tune wrapped in a Markdown code fence, a tune
with prose around it, or a tune without the ``X:`` reference line. ChatMusician's demo assumed an
``X:`` block and crashed otherwise; here every case returns a list (possibly empty), never raises.

Rules (line based, ABC 2.1 in spirit):
- a tune starts at an ``X:`` line, or -- without ``X:`` -- at a run of header field lines (``T:``,
  ``M:``, ``L:``, ``K:`` ...) that contains ``K:``;
- it continues over music lines, field lines (``w:``, ``V:``, ``P:`` ...) and ``%`` comments;
- it ends at a blank line, a code fence, the next ``X:`` line, a line of prose, or ``</s>``;
- a tune must contain at least one music line with a pitched note, so bare headers (and bodies of rests
  alone) are not tunes;
- ``Z:|`` or ``A::`` at a line start is music, as abc2midi reads it ("either a :| repeat or a field command":
  it takes the repeat), not a field; a line of multi-bar rests (``Z4|``) is music too.
Returned tunes always start with an ``X:`` line (``X:1`` is added when it was missing) so that
abc2midi / abcm2ps accept them as-is.
"""
from __future__ import annotations

import re

_FIELD = re.compile(r"^([A-Za-z]):(?![|:])")  # (abc2midi reads "Z:|", "A::" as a rest / note and a repeat)
_SPECIAL_TOKENS = re.compile(r"</?s>|<pad>|<unk>")
_FENCE = re.compile(r"^\s*(```|~~~)")
_NOTE = re.compile(r"[A-Ga-gzZx]")  # notes and rests: a music line
_PITCH = re.compile(r"[A-Ga-g]")    # a tune needs at least one pitched note
_WORD = re.compile(r"[A-Za-z]{3,}")
_NOTE_LETTERS = set("ABCDEFGabcdefgxzZuv")  # notes, rests and the bowings u/v ("vdu", "B2vd uc" in fiddle tunes)
# header fields that may open a tune that has no X: line
_HEADER_FIELDS = set("TMLKCQROAZNSHBDFGIP")


def _strip_inline(line: str) -> str:
    """Removes the parts of an ABC line that may legitimately contain words."""
    line = re.sub(r'"[^"]*"', " ", line)            # chord symbols and annotations
    line = re.sub(r"![^!\s]*!", " ", line)          # !decorations!
    line = re.sub(r"\+[^+\s]*\+", " ", line)        # +decorations+
    line = re.sub(r"\[[A-Za-z]:[^\]]*\]", " ", line)  # inline fields [K:G]
    line = line.split("%", 1)[0]                    # trailing comment
    return line


def is_prose(line: str) -> bool:
    """True for a line of natural language: a 3+ letter word with two or more non-note letters.

    Note runs like ``cdef``, ``uABc`` or ``vdu`` (bowings + notes) pass; ``Here``, ``tune``, ``the`` do not
    (inference.abc_constraint refuses such a run in a tune, so a constrained reply is never read as prose)."""
    for w in _WORD.findall(_strip_inline(line)):
        if sum(ch not in _NOTE_LETTERS for ch in w) >= 2:
            return True
    return False


def _is_field(line: str) -> bool:
    return bool(_FIELD.match(line.strip()))


def _is_music(line: str) -> bool:
    s = line.strip()
    if not s or _is_field(s) or s.startswith("%"):
        return False
    return not is_prose(s) and bool(_NOTE.search(_strip_inline(s)))


def _clean_lines(text: str) -> list[str]:
    text = _SPECIAL_TOKENS.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return text.split("\n")


def extract_abc(text: str | None) -> list[str]:
    """All ABC tunes found in ``text``, in order; ``[]`` when there are none (never raises)."""
    if not text or not isinstance(text, str):
        return []
    lines = _clean_lines(text)
    tunes: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        s = lines[i].strip()
        m = _FIELD.match(s)
        if not m or (m.group(1) != "X" and m.group(1) not in _HEADER_FIELDS):
            i += 1
            continue
        # header: consecutive field / comment lines
        start = i
        header: list[str] = []
        has_x = m.group(1) == "X"
        has_k = False
        while i < n:
            s = lines[i].strip()
            if _is_field(s) and not (header and s.startswith("X:")):
                header.append(s)
                has_k = has_k or s.startswith("K:")
                i += 1
                if s.startswith("K:"):
                    break
            elif s.startswith("%") and header:
                header.append(s)
                i += 1
            else:
                break
        if not has_k and not has_x:
            i = max(i, start + 1)
            continue
        body: list[str] = []
        while i < n:
            raw = lines[i]
            s = raw.strip()
            if not s or _FENCE.match(raw) or s.startswith("X:"):
                break
            if _is_music(s) or _is_field(s) or s.startswith("%"):
                body.append(raw.rstrip())
                i += 1
            else:
                break
        if any(_is_music(b) and _PITCH.search(_strip_inline(b)) for b in body):
            if not has_x:
                header.insert(0, "X:1")
            tunes.append("\n".join(header + body) + "\n")
        i = max(i, start + 1)
    return tunes


def first_abc(text: str | None) -> str | None:
    """The first tune of ``text`` or None."""
    tunes = extract_abc(text)
    return tunes[0] if tunes else None

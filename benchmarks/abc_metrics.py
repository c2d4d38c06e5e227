"""Model-free checks of ABC tunes: header fields, bar-duration consistency, repeat structure,
memorisation (exact and n-gram near copies) and key/meter compliance.

Used by ``benchmarks.abc_quality``; everything here is plain Python on the tune text.

Bar-duration consistency: every bar's total note/rest duration (in whole notes, from ``L:`` and the
note lengths) is compared with the bar length of ``M:``. Handled: default unit lengths (ABC 2.1: 1/16
when the meter is below 3/4, else 1/8), ``M:C``/``M:C|``, compound meters ``2+3/8``, inline and body
meter/length changes (``[M:3/4]``, ``L:1/16`` lines), chords (the first note's length times the
chord's multiplier), tuplets ``(3abc`` / ``(p:q:r``, broken rhythm (``>``/``<``, duration preserving),
grace notes (no time), decorations, chord symbols, ties, slurs, voice overlay ``&`` (the longest
layer counts), multi-bar rests ``Z4``, separate voices (``V:``) and numbered endings. A bar shorter
than the meter is accepted where music allows it: the first bar of a voice (pickup), its last bar,
and the bars next to a repeat sign or a section end (``|:``, ``:|``, ``::``, ``||``, ``|]``, ``[|``)
-- pickups into a section and the incomplete bar before a repeat. Longer bars are never accepted.
A line end right after an exactly full bar stands for a plain barline (EsAC transcriptions write one
bar per line and no ``|``); a line ending mid-bar carries the bar on to the next line.
"""
from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

from data_preprocess.abc_meter import (  # noqa: F401 - re-exported: the checker's public names
    BARLINE,
    FIELD_LINE,
    INLINE_FIELD,
    MODES,
    meter_numerator,
    meter_value,
    normalise_key,
    normalise_meter,
    note_length,
    split_header_body,
    tuplet_q,
    unit_value,
)

# ------------------------------------------------------------------------------------------- headers

def split_tunes(text: str) -> list[str]:
    """Splits a multi-tune ABC file at its ``X:`` lines; text before the first ``X:`` (a file header)
    is dropped. A text without any ``X:`` line is one tune if it has a ``K:`` field."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = [m.start() for m in re.finditer(r"(?m)^X:", text)]
    if not starts:
        return [text.strip() + "\n"] if re.search(r"(?m)^K:", text) else []
    bounds = starts + [len(text)]
    return [text[a:b].strip() + "\n" for a, b in itertools.pairwise(bounds) if text[a:b].strip()]


def body_field(line: str) -> re.Match | None:
    """A body line that is a field (``M:3/4``, ``w: la``): not one whose colon starts a barline -- abc2midi
    plays ``D:: ::`` and ``T:|`` as music (a note or decoration, then a repeat), as the constraint reads them."""
    return FIELD_LINE.match(line) if line[2:3] not in (":", "|") else None


def has_repeats(abc: str) -> bool:
    """True when the tune body has a repeat sign (``|:``, ``:|`` or ``::``)."""
    _, body = split_header_body(abc)
    text = "\n".join(ln.split("%", 1)[0] for ln in body if not body_field(ln.strip()))
    text = re.sub(r'"[^"]*"', "", text)
    return bool(re.search(r"\|:|:\||::", text))


# ------------------------------------------------------------------------------------ bar durations

_NOTE = re.compile(r"(\^{1,2}|_{1,2}|=)?([A-Ga-g])([',]*)(\d*)(/*)(\d*)")
_REST = re.compile(r"([zx])(\d*)(/*)(\d*)")
_MREST = re.compile(r"([ZX])(\d*)")
_TUPLET = re.compile(r"\((\d+)(?::(\d*))?(?::(\d*))?")
_BAR = re.compile(r"\[\||:*\|+\]?:*|::+|\|\]")
_ENDING = re.compile(r"\[?\d+(?:[,-]\d+)*")
_DECORATION_LETTERS = set("HIJKLMNOPQRSTUVWhijklmnopqrstuvwy")
_BOUNDARY = ("repeat", "section")


def _barline_kind(tok: str) -> str:
    if ":" in tok:
        return "repeat"
    if tok in ("||", "|]", "[|") or tok.endswith("]") or tok.count("|") > 1:
        return "section"
    return "plain"


@dataclass
class Bar:
    duration: Fraction
    expected: Fraction | None
    left: str                    # kind of the barline before: start | plain | repeat | section
    right: str                   # kind of the barline after: plain | repeat | section | end
    voice: str
    multirest: bool = False


@dataclass
class BarCheck:
    n_bars: int = 0              # bars with a known meter
    n_match: int = 0             # of those, bars whose duration is consistent
    n_unscorable: int = 0        # bars without a usable M: (free meter / none)
    mismatches: list[dict] = field(default_factory=list)

    @property
    def consistent(self) -> bool | None:
        return (self.n_match == self.n_bars) if self.n_bars else None


def bars_of(abc: str) -> list[Bar]:
    """Every bar of the tune with its duration and expected length (see the module doc)."""
    header, body = split_header_body(abc)
    meter_str = header.get("M")
    meter = meter_value(meter_str)
    unit = unit_value(header.get("L"), meter)
    bars: list[Bar] = []
    voice = "1"
    state: dict[str, dict] = defaultdict(lambda: {"left": "start"})
    cur = {"dur": Fraction(0), "layers": [], "n": 0, "meter": None, "multi": False}
    tup = {"left": 0, "factor": Fraction(1)}

    def set_field(letter: str, value: str):
        nonlocal meter_str, meter, unit, voice
        if letter == "M":
            meter_str, meter = value, meter_value(value)
            if cur["n"] == 0:
                cur["meter"] = None  # a meter change at the start of a bar applies to this bar
        elif letter == "L":
            unit = unit_value(value, meter)
        elif letter == "V":
            close_bar("plain", force=False)
            voice = value.split()[0] if value.split() else "1"

    def add(d: Fraction):
        if tup["left"] > 0:
            d *= tup["factor"]
            tup["left"] -= 1
        if cur["n"] == 0 and cur["meter"] is None:
            cur["meter"] = (meter, meter_str)
        cur["dur"] += d
        cur["n"] += 1

    def close_bar(kind: str, force: bool = True):
        total = max([cur["dur"]] + cur["layers"])
        if cur["n"] > 0 or cur["multi"]:
            m = cur["meter"][0] if cur["meter"] else meter
            bars.append(Bar(total, m, state[voice]["left"], kind, voice, cur["multi"]))
            state[voice]["left"] = kind
        elif force and kind != "plain":
            state[voice]["left"] = kind if state[voice]["left"] in ("start", "plain") else state[voice]["left"]
            if bars and bars[-1].voice == voice and bars[-1].right == "plain":
                bars[-1].right = kind  # "| |:" written as two barlines: the boundary belongs to the last bar
        cur.update(dur=Fraction(0), layers=[], n=0, meter=None, multi=False)

    for raw in body:
        line = raw.split("%", 1)[0] if not raw.lstrip().startswith("%%") else ""
        s = line.strip()
        if not s:
            continue
        fm = body_field(s)
        if fm:
            if fm.group(1) in "MLV":
                set_field(fm.group(1), fm.group(2).strip())
            continue
        i, n = 0, len(line)
        while i < n:
            c = line[i]
            if c == '"':
                j = line.find('"', i + 1)
                i = n if j < 0 else j + 1
            elif c == "!":
                j = line.find("!", i + 1)
                i = n if j < 0 else j + 1
            elif c == "+" and re.match(r"\+[^+\s|]*\+", line[i:]):
                i = line.find("+", i + 1) + 1
            elif c == "{":
                j = line.find("}", i + 1)
                i = n if j < 0 else j + 1
            elif c == "[":
                fmi = INLINE_FIELD.match(line, i)
                if fmi:
                    if fmi.group(1) in "MLV":
                        set_field(fmi.group(1), fmi.group(2).strip())
                    i = fmi.end()
                elif line.startswith("[|", i):
                    close_bar("section")
                    i += 2
                elif i + 1 < n and line[i + 1].isdigit():
                    i = _ENDING.match(line, i).end()  # numbered ending [1 [2
                else:  # a chord: first note's length times the multiplier after ]
                    j = line.find("]", i + 1)
                    if j < 0:
                        i += 1
                        continue
                    inner = _NOTE.search(line, i + 1, j)
                    first = note_length(*inner.group(4, 5, 6)) if inner else Fraction(1)
                    mult = re.match(r"(\d*)(/*)(\d*)", line[j + 1:])
                    add(unit * first * note_length(*mult.groups()))
                    i = j + 1 + mult.end()
            elif c in "|:":
                mb = _BAR.match(line, i)
                if not mb or not mb.group(0):
                    i += 1
                    continue
                close_bar(_barline_kind(mb.group(0)))
                i = mb.end()
                me = _ENDING.match(line, i)  # |1 :|2
                if me and line[i:i + 1].isdigit():
                    i = me.end()
            elif c == "&":
                cur["layers"].append(cur["dur"])
                cur["dur"] = Fraction(0)
                i += 1
            elif c == "(":
                mt = _TUPLET.match(line, i)
                if mt:
                    p = int(mt.group(1))
                    q = int(mt.group(2)) if mt.group(2) else tuplet_q(p, meter_str)
                    r = int(mt.group(3)) if mt.group(3) else p
                    tup.update(left=r, factor=Fraction(q, p) if p else Fraction(1))
                    i = mt.end()
                else:
                    i += 1
            else:
                mn = _NOTE.match(line, i)
                if mn:
                    add(unit * note_length(*mn.group(4, 5, 6)))
                    i = mn.end()
                    continue
                mr = _REST.match(line, i)
                if mr:
                    add(unit * note_length(*mr.group(2, 3, 4)))
                    i = mr.end()
                    continue
                mm = _MREST.match(line, i)
                if mm:
                    cur["multi"] = True
                    if cur["meter"] is None:
                        cur["meter"] = (meter, meter_str)
                    i = mm.end()
                    continue
                i += 1  # decorations (~ . H-W), ties, spaces, broken rhythm, `, \, $ ...
        # a line end right after an exactly full bar stands for its barline (EsAC writes one bar per line with
        # no "|"; inference.abc_constraint reads it the same way), except after a "\\" (the line goes on) or a
        # "*"; a bar ending mid-line goes on
        expected = cur["meter"][0] if cur["meter"] else meter
        if (cur["n"] and not cur["multi"] and tup["left"] == 0 and expected is not None
                and s[-1] not in "\\*" and max([cur["dur"]] + cur["layers"]) == expected):
            close_bar("plain")
    close_bar("end")
    if bars:
        bars[-1].right = "end"
    return bars


_NOT_MUSIC_LINE = re.compile(r"^\s*(%|[A-Za-z]:(?![|:]))")


def bar_variety(abc: str) -> dict:
    """How varied the bars are -- a musical measure, not a rule of ABC: ``bars`` (texts between barlines,
    spaces ignored), ``empty`` (bars with no note or rest: "| |"), ``distinct`` (different non-empty bars)
    and ``max_same`` (the longest run of one bar repeated in a row; music21's 12,868 tunes: 5 at most, in 3
    tunes). A tune of "G2G2G2|" twenty times over keeps time and passes abc2midi, and is not music."""
    _, body = split_header_body(abc)
    text = "\n".join(line for line in body if not _NOT_MUSIC_LINE.match(line))
    text = re.sub(r'"[^"]*"', lambda m: m.group(0).replace("|", "/"), text)  # (a quote's "|" is no barline)
    bars = [re.sub(r"\s+", "", b) for b in BARLINE.split(text)]
    if bars and not bars[0]:
        bars = bars[1:]
    if bars and not bars[-1]:
        bars = bars[:-1]
    full = [b for b in bars if re.search(r"[A-Ga-gzxZ]", re.sub(r'"[^"]*"', "", b))]
    run = best = 0
    prev = None
    for b in full:
        run = run + 1 if b == prev else 1
        best, prev = max(best, run), b
    return {"bars": len(bars), "empty": len(bars) - len(full), "distinct": len(set(full)), "max_same": best}


def check_bars(abc: str) -> BarCheck:
    """Counts consistent bars (see the module doc for what is allowed)."""
    res = BarCheck()
    by_voice: dict[str, list[Bar]] = defaultdict(list)
    for b in bars_of(abc):
        by_voice[b.voice].append(b)
    for voice, bars in by_voice.items():
        for k, b in enumerate(bars):
            if b.expected is None:
                res.n_unscorable += 1
                continue
            res.n_bars += 1
            partial_ok = (k == 0 or k == len(bars) - 1 or b.left in _BOUNDARY or b.right in _BOUNDARY
                          or b.left == "start" or b.right == "end")
            if b.multirest or b.duration == b.expected or (0 < b.duration < b.expected and partial_ok):
                res.n_match += 1
            else:
                res.mismatches.append({"voice": voice, "bar": k + 1, "duration": str(b.duration),
                                       "expected": str(b.expected)})
    return res


# ------------------------------------------------------------------------------------ memorisation


def normalise_tune(abc: str) -> str:
    """Canonical text for copy detection: M/L/K header values + body, without X:/T:/other header
    lines, comments and whitespace."""
    header, body = split_header_body(abc)
    keep = "".join(f"{k}:{header[k]};" for k in ("M", "L", "K") if k in header)
    lines = [ln.split("%", 1)[0] for ln in body if not re.match(r"^[wWTXNZSHR]:", ln.strip())]
    return keep + re.sub(r"\s+", "", "".join(lines))


def _body_ngrams(norm: str, n: int) -> set[str]:
    body = norm.split(";")[-1] if ";" in norm else norm
    return {body[i:i + n] for i in range(max(0, len(body) - n + 1))}


class MemorisationIndex:
    """Exact copies (same normalised tune) and near copies (share of the candidate's character
    n-grams of the body found in one single training tune) against a training corpus."""

    def __init__(self, train_tunes: list[str], n: int = 10):
        self.n = n
        self.exact: dict[str, int] = {}
        self.index: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(train_tunes):
            norm = normalise_tune(t)
            self.exact.setdefault(norm, i)
            for g in _body_ngrams(norm, n):
                self.index[g].append(i)
        self.size = len(train_tunes)

    def check(self, abc: str) -> dict:
        norm = normalise_tune(abc)
        grams = _body_ngrams(norm, self.n)
        hits: dict[int, int] = defaultdict(int)
        for g in grams:
            for i in self.index.get(g, ()):
                hits[i] += 1
        best, best_i = 0.0, None
        if grams and hits:
            best_i, cnt = max(hits.items(), key=lambda kv: kv[1])
            best = cnt / len(grams)
        return {"exact": norm in self.exact, "max_overlap": best, "nearest": best_i, "n_ngrams": len(grams)}


def compliance(abc: str, key: str | None, meter: str | None, title: str | None = None) -> dict:
    """Whether the tune's K:/M:/T: match the requested key/meter/title (None where nothing was requested;
    titles compare without case and surrounding spaces)."""
    header, _ = split_header_body(abc)
    out = {"key": None, "meter": None, "title": None}
    if title:
        out["title"] = " ".join(title.split()).casefold() == " ".join((header.get("T") or "").split()).casefold()
    if key:
        want, got = normalise_key(key), normalise_key(header.get("K"))
        out["key"] = want is not None and want == got
    if meter:
        out["meter"] = normalise_meter(meter) == normalise_meter(header.get("M"))
    return out

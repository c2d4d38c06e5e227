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
"""
from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

# ------------------------------------------------------------------------------------------- headers

_FIELD_LINE = re.compile(r"^([A-Za-z]):(?!\|)(.*)$")
_INLINE_FIELD = re.compile(r"\[([A-Za-z]):([^\]]*)\]")


def split_header_body(abc: str) -> tuple[dict[str, str], list[str]]:
    """Header fields (first value of each letter, up to and including ``K:``) and the body lines."""
    header: dict[str, str] = {}
    lines = abc.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for i, line in enumerate(lines):
        m = _FIELD_LINE.match(line.strip())
        if m:
            header.setdefault(m.group(1), m.group(2).split("%", 1)[0].strip())
            if m.group(1) == "K":
                return header, lines[i + 1:]
        elif line.strip() and not line.strip().startswith("%"):
            return header, lines[i:]  # music before any K: (malformed): treat the rest as body
    return header, []


def split_tunes(text: str) -> list[str]:
    """Splits a multi-tune ABC file at its ``X:`` lines; text before the first ``X:`` (a file header)
    is dropped. A text without any ``X:`` line is one tune if it has a ``K:`` field."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = [m.start() for m in re.finditer(r"(?m)^X:", text)]
    if not starts:
        return [text.strip() + "\n"] if re.search(r"(?m)^K:", text) else []
    bounds = starts + [len(text)]
    return [text[a:b].strip() + "\n" for a, b in itertools.pairwise(bounds) if text[a:b].strip()]


def meter_value(m: str | None) -> Fraction | None:
    """Bar length in whole notes: ``6/8`` -> 3/4, ``C`` -> 1, ``C|`` -> 1, ``2+3/8`` -> 5/8, ``none`` -> None."""
    if m is None:
        return None
    s = m.strip().split("%", 1)[0].strip()
    if s in ("C", "c"):
        return Fraction(1)
    if s in ("C|", "c|"):
        return Fraction(1)
    mm = re.fullmatch(r"\(?([\d+\s]+)\)?\s*/\s*(\d+)", s)
    if not mm:
        return None
    try:
        num = sum(int(x) for x in mm.group(1).split("+") if x.strip())
        den = int(mm.group(2))
    except ValueError:
        return None
    return Fraction(num, den) if num > 0 and den > 0 else None


def meter_numerator(m: str | None) -> int | None:
    mm = re.match(r"\s*\(?([\d+\s]+)\)?\s*/", m or "")
    return sum(int(x) for x in mm.group(1).split("+") if x.strip()) if mm else None


def unit_value(lf: str | None, meter: Fraction | None) -> Fraction:
    """``L:`` as a fraction; the ABC 2.1 default when absent or unreadable."""
    if lf:
        mm = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", lf.split("%", 1)[0])
        if mm and int(mm.group(1)) > 0 and int(mm.group(2)) > 0:
            return Fraction(int(mm.group(1)), int(mm.group(2)))
    if meter is not None and meter < Fraction(3, 4):
        return Fraction(1, 16)
    return Fraction(1, 8)


def normalise_meter(m: str | None) -> str | None:
    if m is None:
        return None
    s = re.sub(r"\s+", "", m.split("%", 1)[0])
    return {"C": "4/4", "C|": "2/2"}.get(s, s) or None


_MODES = {"": "maj", "maj": "maj", "major": "maj", "ion": "maj", "ionian": "maj", "m": "min", "min": "min",
          "minor": "min", "aeo": "min", "aeolian": "min", "dor": "dor", "dorian": "dor", "phr": "phr",
          "phrygian": "phr", "lyd": "lyd", "lydian": "lyd", "mix": "mix", "mixolydian": "mix", "loc": "loc",
          "locrian": "loc"}


def normalise_key(k: str | None) -> tuple[str, str] | None:
    """``"G"``/``"Gmaj"``/``"G major"`` -> ("G", "maj"); ``"Em"``/``"E minor"`` -> ("E", "min");
    ``"F#m"``/``"F sharp minor"`` -> ("F#", "min"); ``"Bb"``/``"B flat"`` -> ("Bb", "maj"). None if unreadable."""
    if not k:
        return None
    s = k.split("%", 1)[0].strip()
    s = re.sub(r"\s+(clef|middle|transpose|octave|stafflines)=.*$", "", s, flags=re.IGNORECASE)
    mm = re.match(r"^([A-Ga-g])(#|b|♯|♭|(?i:\s*sharp|\s*flat|-sharp|-flat))?\s*([A-Za-z]*)", s)
    if not mm:
        return None
    acc = (mm.group(2) or "").strip().lstrip("-")
    acc = acc.lower() if len(acc) > 1 else acc
    acc = {"♯": "#", "sharp": "#", "♭": "b", "flat": "b"}.get(acc, acc)
    mode = _MODES.get(mm.group(3).lower()[:10], _MODES.get(mm.group(3).lower()[:3]))
    if mode is None:
        return None
    return mm.group(1).upper() + acc, mode


def has_repeats(abc: str) -> bool:
    """True when the tune body has a repeat sign (``|:``, ``:|`` or ``::``)."""
    _, body = split_header_body(abc)
    text = "\n".join(ln.split("%", 1)[0] for ln in body if not _FIELD_LINE.match(ln.strip()))
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


def _length(num: str, slashes: str, den: str) -> Fraction:
    n = int(num) if num else 1
    if den:
        d = int(den)
    elif slashes:
        d = 2 ** len(slashes)
    else:
        d = 1
    if slashes and den and len(slashes) > 1:  # "a//4": unusual; treat each extra slash as /2
        d *= 2 ** (len(slashes) - 1)
    return Fraction(n, d) if d else Fraction(n)


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
    def share(self) -> float | None:
        return self.n_match / self.n_bars if self.n_bars else None

    @property
    def consistent(self) -> bool | None:
        return (self.n_match == self.n_bars) if self.n_bars else None


def tuplet_q(p: int, meter_str: str | None) -> int:
    """ABC 2.1 default for q in (p:q:r."""
    if p in (2, 4, 8):
        return 3
    if p in (3, 6):
        return 2
    num = meter_numerator(meter_str)
    return 3 if num and num % 3 == 0 and num > 3 else 2


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
        fm = _FIELD_LINE.match(s)
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
                fmi = _INLINE_FIELD.match(line, i)
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
                    first = _length(*inner.group(4, 5, 6)) if inner else Fraction(1)
                    mult = re.match(r"(\d*)(/*)(\d*)", line[j + 1:])
                    add(unit * first * _length(*mult.groups()))
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
                    add(unit * _length(*mn.group(4, 5, 6)))
                    i = mn.end()
                    continue
                mr = _REST.match(line, i)
                if mr:
                    add(unit * _length(*mr.group(2, 3, 4)))
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
    close_bar("end")
    if bars:
        bars[-1].right = "end"
    return bars


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


def compliance(abc: str, key: str | None, meter: str | None) -> dict:
    """Whether the tune's K:/M: match the requested key/meter (None where nothing was requested)."""
    header, _ = split_header_body(abc)
    out = {"key": None, "meter": None}
    if key:
        want, got = normalise_key(key), normalise_key(header.get("K"))
        out["key"] = want is not None and want == got
    if meter:
        out["meter"] = normalise_meter(meter) == normalise_meter(header.get("M"))
    return out

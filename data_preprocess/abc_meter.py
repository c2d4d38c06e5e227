"""ABC arithmetic shared by the bar checker (``benchmarks.abc_metrics``) and the constrained decoder
(``inference.abc_constraint``): header fields, meter / unit-length / key values, note lengths and the
tuplet default. One copy, in the lowest layer, so the checker that scores tunes and the constraint that
makes them agree on what a bar is.
"""
from __future__ import annotations

import re
from fractions import Fraction

# a header field line ("K: D", not the "|:" that starts a repeat) -> (letter, value); an inline field "[K:D]"
FIELD_LINE = re.compile(r"^([A-Za-z]):(?!\|)(.*)$")
INLINE_FIELD = re.compile(r"\[([A-Za-z]):([^\]]*)\]")
# a barline as plain text ("|", "||", "|]", "[|", "|:", ":|", "::", "|1", ":|2" ...): what splits a body into
# bar texts, for the constraint's repeated-bar cap and the benchmarks' bar-variety measure alike
BARLINE = re.compile(r"[:\[]*\|[|:\]0-9]*|::")


def split_header_body(abc: str) -> tuple[dict[str, str], list[str]]:
    """Header fields (first value of each letter, up to and including ``K:``) and the body lines."""
    header: dict[str, str] = {}
    lines = abc.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for i, line in enumerate(lines):
        m = FIELD_LINE.match(line.strip())
        if m:
            header.setdefault(m.group(1), m.group(2).split("%", 1)[0].strip())
            if m.group(1) == "K":
                return header, lines[i + 1:]
        elif line.strip() and not line.strip().startswith("%"):
            return header, lines[i:]  # music before any K: (malformed): treat the rest as body
    return header, []


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


MODES = {"": "maj", "maj": "maj", "major": "maj", "ion": "maj", "ionian": "maj", "m": "min", "min": "min",
          "minor": "min", "aeo": "min", "aeolian": "min", "dor": "dor", "dorian": "dor", "phr": "phr",
          "phrygian": "phr", "lyd": "lyd", "lydian": "lyd", "mix": "mix", "mixolydian": "mix", "loc": "loc",
          "locrian": "loc"}
MODE_NAMES = {"maj": "major", "min": "minor", "dor": "dorian", "phr": "phrygian", "lyd": "lydian", "mix": "mixolydian",
              "loc": "locrian"}   # a mode of MODES -> the word a caption or an instruction uses


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
    mode = MODES.get(mm.group(3).lower()[:10], MODES.get(mm.group(3).lower()[:3]))
    if mode is None:
        return None
    return mm.group(1).upper() + acc, mode


def note_length(num: str, slashes: str, den: str) -> Fraction:
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


def tuplet_q(p: int, meter_str: str | None) -> int:
    """ABC 2.1 default for q in (p:q:r."""
    if p in (2, 4, 8):
        return 3
    if p in (3, 6):
        return 2
    num = meter_numerator(meter_str)
    return 3 if num and num % 3 == 0 and num > 3 else 2

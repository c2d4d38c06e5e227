"""ABC-aware constrained generation: a ``LogitsProcessor`` that masks every token whose text would make
the reply stop being a well-formed ABC tune with the header fields the prompt asked for and bars that
keep time.

    from inference.abc_constraint import extract_fields, ABCConstraintProcessor
    fields = extract_fields("Compose a jig in D major titled \\"The Kesh\\".")  # {'R': 'jig', 'K': 'D', 'T': ...}
    proc = ABCConstraintProcessor(tokenizer, [fields], prompts=[prompt])
    model.generate(..., logits_processor=LogitsProcessorList([proc]))

It only masks (sets logits to -inf); it never edits text. Candidate tokens are checked by feeding their
TEXT, byte by byte, to :class:`AbcState`, an incremental ABC state machine, so any tokenizer works
(pieces that span several ABC symbols, byte-fallback pieces, SentencePiece or byte-level BPE).

What the state machine checks
-----------------------------
* Before the tune: at most one line of text (up to 80 chars: a chat reply's "Here it is:").
* Header: ``X:`` (digits) first, ``K:`` last; the requested fields (``T: M: L: K: R: O:``) present with
  exactly the requested value (``K`` may be requested by mode only: "a minor key"), each written once;
  ``K:`` is refused until every other requested field is written; at most 24 header lines. Unrequested
  ``M:``/``L:``/``K:`` values must stay a prefix of a valid value (so no value can be started that
  cannot be finished); ``L:`` is ``1/N`` (N a power of two up to 64: what abc2midi accepts).
* Body, per bar: the duration (in whole notes, from ``L:`` and each note's length) never exceeds the
  bar length that ``M:`` implies (``M:C`` = 4/4, ``M:C|`` = 2/2, ``M:none`` / no ``M:`` = free meter,
  unchecked); a bar closed by a plain barline must be full, except the first bar of the tune or of a
  voice (a pickup) and the bars next to a repeat or section barline (``|: :| :: || |] [|``): the same
  rule as ``benchmarks.abc_metrics.check_bars``, so what this allows that checker accepts. Handled:
  note lengths ``A3/2 A/ A//``, rests ``z x``, multi-bar rests ``Z4``, chords ``[ceg]2`` (first note's
  length times the multiplier), tuplets ``(3abc`` ``(p:q:r`` (a barline inside one is refused),
  broken rhythm ``> >> <`` (duration preserving), grace notes ``{g}`` (no time), ties, slurs,
  decorations ``~ . T u v ... !trill! +trill+``, chord symbols / annotations ``"Am"``, numbered endings
  ``[1 |1 :|2``, inline and body-line fields ``[M:3/4] [L:1/16] [K:G] V:2`` (a meter change applies
  from the next bar it starts), voice overlay ``&``, comments ``%``. Body field lines are ABC 2.1's body
  fields only (``w: W: P: V: K: L: M: Q: T: N: I:`` ...: abc2midi refuses the others there). Text stays
  well-formed UTF-8, so the decoded reply is byte for byte the text that was checked.
* End: EOS only after a barline that closed a complete bar (full, or completing the pickup), with no
  chord, slur, tuplet, quote, decoration or broken rhythm open; a blank line ends the tune (only then
  allowed) after which only whitespace or EOS may follow.

A line end right after an exactly full bar stands for its barline (EsAC writes one bar per line, no ``|``);
a broken rhythm may pair across a line end; a lone ``:`` right after a barline is read as abc2midi reads it
(ignored: ``:|\n: B``). What real music it still refuses, and why, is counted over a corpus by
``python -m benchmarks.constraint_property``: bars that do not keep time (a line past a bar with no ``|``,
unbarred music whose notes cross the bars), a header line that is not a field, an end in an incomplete bar,
more empty bars than its cap. Also refused: a tuplet across a barline, a tie between two spellings of one
pitch (``_A-^G``). Not checked: pitch (any
note in any key), beaming, lyrics alignment, body key/meter changes (a tune may modulate: the *header* carries what was
asked), voices agreeing with each other.

abc2midi's own rules (it is the renderer users play tunes with; each rule was found by feeding abc2midi 4.84 the
case, and tests/test_abc_constraint.py re-checks the table against the binary): broken pairs written equally long
and not chained, no tuplet in a pair or in a tuplet, a repeat opened by ``|:`` ``::`` ``|:|`` closed by ``:|``
before the end and not opened twice (``:|`` without ``|:`` is fine), numbered endings (a later one only after
``:|``; a first one closed by ``:|``), ``'`` only on a-g and ``,`` only on A-G, chord symbols of the chord types it
plays or annotations (``^ _ < > @``), the one-letter decorations it plays only before a note, rest or chord,
a tie only after a note or chord and followed by a note (or chord) of the tied pitch -- same letter and octave, the
accidental repeated or left out -- with no rest, grace note, ``&``, voice change or end in between.
Budget steering: a header still open at half of ``max_new_tokens`` is hurried to its ``K:``; in the last 48 tokens
the tune is closed (``AbcState.finish_text``: the bar filled with a tonic note, then ``:|`` or ``|]``).

Decoding strategy (speed)
-------------------------
Each token's text is computed once. The processor runs after the repetition penalty and before
temperature / top-k / top-p (that is where transformers puts a custom ``logits_processor``): the
warpers then see the model's distribution restricted to allowed tokens, so top-k/top-p keep their
meaning ("the k most likely *allowed* tokens") and can never leave nothing to sample. Per step and
row it walks the highest-scoring tokens in logit order (at most ``top_n`` = max(64, top-k)) through a
transition cache keyed by (state, token) and stops as soon as what the warpers after it keep is
decided: greedy at the first allowed token; top-k after k allowed ones; top-p once the allowed mass
found is at least top_p times all the allowed mass still possible (found + not yet seen, under the same
temperature) -- so the sampled distribution is exactly the masked model distribution, checked on a
handful of candidates (about 1-3 at ChatMusician's temperature 0.2); a walk that reaches ``top_n``
first keeps what it found (an implicit top-``top_n`` of the allowed tokens, the one approximation).
Everything not found allowed is masked. Only when none of them passes is the whole vocabulary walked, as a byte trie pruned by the
state machine (a rejected prefix rejects every token under it); the result is
cached per state. If even that finds nothing (a bug), the row is ended with EOS and the reason is kept
in :meth:`ABCConstraintProcessor.report` -- never a hang or a traceback.
"""
from __future__ import annotations

import functools
import json
import re
import time
from fractions import Fraction

import regex
import torch
from transformers import LogitsProcessor

from data_preprocess.abc_meter import (
    BARLINE,
    MODES,
    meter_value,
    normalise_key,
    split_header_body,
    tuplet_q,
)

CONSTRAINED_FIELDS = ("T", "M", "L", "R", "O", "K")  # header letters a request can fix, K last


class ConstraintError(ValueError):
    """A request the constraint cannot satisfy (bad field value, tokenizer that cannot spell ABC)."""


# ------------------------------------------------------------------------------------------ fields

_NOTE_LETTERS = frozenset("ABCDEFGabcdefg")
_DIGITS = frozenset("0123456789")
# abc2midi 4.84's one-letter decorations, each written right before a note, rest, chord or another of
# them ("T(B", 'T"C"B', "T{c}B", "T!p!B" are its errors; ".(" is fine), no roll or trill (~ R T) on a chord;
# the other letters of ABC 2.1's H-W h-w it ignores with a warning, so anything may follow those (real
# tunes write "(uGE)" "k" ...)
_KNOWN_DECORATIONS = frozenset("HLMOPRSTuv.~")
_DECORATIONS = frozenset("HIJKLMNOPQRSTUVWhijklmnopqrstuvw.~")
_ROLLS = frozenset("RT~")
_NEUTRAL = frozenset(" \t`\\$y*")
_INLINE_FIELDS = frozenset("KLMPQTVWrsw")  # [N:] [R:] [U:] [m:] are abc2midi errors
_AFTER_DECORATION = frozenset("ABCDEFGabcdefg^_=zx[")
_AFTER_RESERVED = _AFTER_DECORATION | frozenset("ZX{(!\"+")
_BODY_FIELDS = frozenset("KLMPQTVWsw")  # what abc2midi takes in a tune body (N: R: U: Z: m: are its errors)
# ABC 2.1's header fields, less three abc2midi reads as commands: "I:" (any key but MIDI is its error, "I: ::
# ::" in 1,118 music21 tunes among them; "I:MIDI ..." reprograms the player), "U:" (a letter redefined: "U:G"
# is an error and "U:G=!trill!" would change what every G means) and "m:" (macros rewrite the music).
_HEADER_LETTERS = frozenset("ABCDFGHKLMNOPQRSTVWXZr")
_DECO_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789<>()-.^_/")
_MODE_WORDS = tuple(MODES)
_MAX_VALUE = 160                    # chars of a field value (music21's longest: 146)
_MAX_HEADER_LINES = 24              # music21's longest header has 21 field lines
_NOTE_OR_REST = frozenset("ABCDEFGabcdefgxzZuv")  # the letters inference.abc_extract reads as music, not prose
_MAX_LEADING_BLANKS = 8             # blanks before a field value (music21: 7 at most, in 3 lines)
_MAX_HURRIED_VALUE = 40             # chars of an unasked header value once the header is hurried
_MAX_COMMENT = 160                  # chars of a % comment (music21's longest comment line: 52)
_MAX_PREAMBLE = 80                  # chars of the one line of text a reply may open with
# Note lengths as music21's tunes write them (31 spellings in 1.7 M notes; "42", "222", "442" occur once each):
# a numerator 1-16, 24 or 32; before a "/" at most 7 ("3/2", "7/4"); denominators 2-16 ("/" "//" "///" too).
# A small model otherwise writes "G42/64" and "222/64": lengths abc2midi plays and no musician writes.
_MAX_DEN = 16
_MIN_LENGTH = Fraction(1, _MAX_DEN)
_DENOMINATORS = ("2", "4", "8", "16")
_NUMERATORS = tuple(str(n) for n in range(1, 17)) + ("24", "32")
_MAX_SLASHED = 7                    # the largest numerator before a "/"
_MAX_SLURS = 4                      # slurs open at once
_MAX_EMPTY_BARS = 4                 # barlines in a row with no music between them, before the first bar of music
_MAX_EMPTY_BARS_LATER = 1           # ... after it (music21: "A |\n| B" is common, 3 tunes have 2 in a row)
_MAX_SAME_BARS = 4                  # identical bars in a row (music21: 16 tunes have 4, 3 tunes have 5)
_MAX_SHORT_BARS = 3                 # bars shorter than the meter in a row ("|1 d2 :|2 d4 |]" + a pickup "A |")
_MAX_TEXT_LINES = 2                 # body text lines (N:, w:, comments ...) in a row with no music between them
_MAX_FIELD_LINES = 3                # ... counting K: L: M: V: lines too (a small model writes "K: D\nK: G\nK: C ...")
_MAX_IDLE = 6                       # quotes, decorations, slurs, ties, K:/M:/L:/V: changes in a row before a note
_MAX_BLANK = 160                    # spaces, tabs, ` \ $ y *, line ends in a row before a note (alignment runs)
_CLOSING_CHARS = frozenset("ABCDEFGabcdefg^_=',0123456789/zx |:])")
_CLOSERS = {"quote": '"', "deco": "!", "pdeco": "+", "grace": "}", "chord": "]", "comment": "\n", "value": "\n"}
_HEADER_TOKENS = 128                # tokens a header may take before it is hurried (without a budget)
_CLOSING_RESERVE = 48               # tokens before max_new_tokens at which a tune is steered to its end


def _deco_bits(c: str) -> int:
    """deco's flags: 8 a roll or trill, 16 a known decoration other than ".", 32 any known decoration, 64 "."."""
    if c not in _KNOWN_DECORATIONS:
        return 0
    return (8 if c in _ROLLS else 0) | (64 if c == "." else 16) | 32


@functools.lru_cache(maxsize=256)
def _spellings(want: Fraction) -> frozenset[str]:
    """Every way a note length of ``want`` units can be written (``""``, ``2``, ``3/2``, ``/``, ``//``, ``1/4`` ...)."""
    out = set()
    for den in (1, *map(int, _DENOMINATORS)):
        n = want * den
        if n.denominator != 1 or not (str(n) in _NUMERATORS if den == 1 else 1 <= n <= _MAX_SLASHED):
            continue
        n = int(n)
        for ns in ({"", "1"} if n == 1 else {str(n)}):
            if den == 1:
                out.add(ns)
            else:
                out.add(f"{ns}/{den}")
                if den <= 8:  # "/" "//" "///" halve, quarter, eighth
                    out.add(ns + "/" * (den.bit_length() - 1))
    return frozenset(out)


def _fill(note: str, units: Fraction, tie: bool = False) -> str | None:
    """``note`` written to last ``units`` units of L: one note where a length spells it, else notes of 16
    units and the rest (a bar of M:22/2 at L:1/2 is "D16 D6"; tied together when ``tie``)."""
    sp = [x for x in _spellings(units) if "//" not in x]
    if sp:
        return note + min(sp, key=len)
    if units <= 16:
        return None
    tail = _fill(note, units - 16, tie)
    return None if tail is None else note + "16" + ("-" if tie else " ") + tail


_QUOTE_FIRST = frozenset("ABCDEFGabcdefg(^_<>@0123456789")  # (digits: fingerings, "4")
# the chord types abc2midi 4.84 plays (found by feeding it each type of music21's chord symbols and a standard
# list: "Gmaj", "Gmin", "G13", "G2" are its errors)
_GCHORD_TYPES = ("", "+", "11", "5", "6", "7", "7sus4", "7sus9", "9", "M7", "M9", "aug", "aug7", "dim", "dim7",
                 "dim9", "m", "m6", "m7", "m7b5", "m9", "maj7", "maj9", "sus", "sus2", "sus4", "sus9")


def _gchord_ok(s: str, whole: bool) -> bool:
    """``s`` (a quote's text so far, from its root letter) is (``whole``: all of) a chord symbol abc2midi
    takes: root, ``#``/``b``, a known type, then free text after a space, "(" or "/bass" ("G is", "G(7)")."""
    if ";" in s:
        return False  # ("G;x": abc2midi reads a second chord after ";")
    i = 2 if len(s) > 1 and s[1] in "#b" else 1
    rest = s[i:]
    j = min((rest.find(ch) for ch in " /(" if ch in rest), default=len(rest))
    t = rest[:j]
    if j == len(rest):
        return t in _GCHORD_TYPES if whole else any(x.startswith(t) for x in _GCHORD_TYPES)
    if t not in _GCHORD_TYPES:
        return False
    tail = rest[j:]
    if tail[0] in " (":
        return True
    b = tail[1:]  # "/bass": a note letter, then anything
    return b[:1] in _NOTE_LETTERS if b else not whole


_FREE_METERS = ("none", "None")  # the spellings abc2midi reads ("M:NONE": "Expecting fraction in form A/B")


def _meter_ok(v: str) -> bool:
    s = v.strip()
    return (s in _FREE_METERS or s in ("C", "C|", "c", "c|")
            or (meter_value(s) is not None and _METER_WHOLE.fullmatch(s) is not None))


def _meter_prefix_ok(v: str) -> bool:
    s = v.lstrip(" ")
    if s.rstrip(" ") != s:           # trailing spaces only after a complete value
        return _meter_ok(s)
    return (any(w.startswith(s) for w in _FREE_METERS) or s in ("C", "C|", "c", "c|")
            or _METER_WHOLE.fullmatch(s, partial=True) is not None)


# numbers of up to 2 digits (music21: 12/8 at most), so a meter cannot run on, without a leading 0; the
# denominator a power of two (abc2midi: "36 b is not a power of 2")
_METER_WHOLE = regex.compile(r"(?:\((?:[1-9][0-9]?\+){0,5}[1-9][0-9]?\)|(?:[1-9][0-9]?\+){0,5}[1-9][0-9]?)"
                             r"/(?:1|2|4|8|16|32|64)")


def _unit_ok(v: str) -> bool:
    """``1/N``, N a power of two up to 64 (abc2midi: "Default length must be 1/X"; all music21 tunes)."""
    m = re.fullmatch(r"\s*1/([0-9]+)\s*", v)
    return bool(m) and m.group(1) in ("1", "2", "4", "8", "16", "32", "64")


def _unit_prefix_ok(v: str) -> bool:
    s = v.lstrip(" ")
    if s.rstrip(" ") != s:
        return _unit_ok(s)
    return s in ("", "1", "1/") or (s.startswith("1/") and any(d.startswith(s[2:]) for d in
                                                                ("1", "2", "4", "8", "16", "32", "64")))


# Q: as abc2midi reads it (music21 writes "1/4=120", "1/4=120 \"Slow\"" and "120"): a tempo number, after
# an optional beat "1/4=", with an optional quoted word before or after ("Q:\"Slow\"" alone, "Q:0",
# "Q:1/4=0", "Q:2/22=60" (a beat of no power of 2), "Q:1/4 3/8=120" and an unclosed quote are its errors).
# A quoted tempo name of abc2midi's alone is a tempo too ("Q:\"Andantino\"").
_TEMPO_NAMES = ("larghissimo", "adagissimo", "lentissimo", "largo", "adagio", "lento", "larghetto", "adagietto",
                "andante", "andantino", "moderato", "allegretto", "allegro", "vivace", "vivo", "presto",
                "allegrissimo", "vivacissimo", "prestissimo")
_TEMPO = regex.compile(r' *(?:(?:"[^"\n]{0,40}" *)?(?:[1-9]/(?:1|2|4|8|16|32|64) *= *)?[1-9][0-9]{0,2}'
                       r'(?: *"[^"\n]{0,40}")?|"(?i:' + "|".join(_TEMPO_NAMES) + r')") *')


# a grace group as abc2midi reads it (music21: "{g}", "{ag}", "{^f}", "{g/a/}", "{[ce]}"): an optional "/",
# then notes (the octave marks of a note outside one: "{c,}" is its error "Bad pitch specifier") and chords
# with short lengths; "{c[1}" (an ending inside) is its error.
_GRACE_NOTE = r"[_^=]{0,2}(?:[A-G],{0,3}|[a-g]'{0,3})(?:[1-9]|[1-9]?/[248]?|//)?"
_GRACE = regex.compile(rf" ?/? ?(?:(?:{_GRACE_NOTE}|\[(?:{_GRACE_NOTE}){{1,4}}\](?:[1-9]|/[248]?|//)?) ?)+")


# a header P: is abc2midi's part order: parts (capitals) and groups "(AB)", each may be followed by a repeat
# count, "." and spaces between ("P:2" is its error "No part to repeat", "P:Verse" "illegal character").
_PART = r"(?:[A-Z][0-9]?|\((?:[A-Z][0-9]?){1,6}\)[0-9]?)"
_PART_ORDER = regex.compile(rf" {{0,2}}{_PART}(?:[ .]{{0,2}}{_PART}){{0,7}} *")


def _tempo_ok(v: str) -> bool:
    return _TEMPO.fullmatch(v) is not None


def _tempo_prefix_ok(v: str) -> bool:
    return _TEMPO.fullmatch(v, partial=True) is not None


# abc2midi's default accompaniment for a meter (store.c setbeat; f, b, c sound, z is silent, each one slot
# of the bar), used where a chord symbol plays: a note of it still sounding when the track ends is its error
# "Sustained notes beyond end of track". A meter not listed plays none; "none" plays as 4/4.
_GCHORD_PATTERNS = {(2, 2): "fzczfzcz", (4, 4): "fzczfzcz", (2, 4): "fzcz", (6, 4): "fzczfzczfzcz",
                    (3, 8): "fzczcz", (5, 8): "fzbcz", (5, 4): "fzbcz", (7, 8): "fzbczcz", (7, 4): "fzbczcz",
                    (3, 4): "fzczcz", (6, 8): "fzcfzc", (9, 8): "fzcfzcfzc", (12, 8): "fzcfzcfzcfzc"}


def _gchord_sounding(meter_str: str | None, t: Fraction) -> bool:
    """A chord-symbol note abc2midi plays is still sounding ``t`` (whole notes) into a bar of ``meter_str``."""
    s = (meter_str or "none").strip()
    num, den = {"C": (4, 4), "C|": (2, 2), "none": (4, 4)}.get(s, (0, 0))
    m = re.fullmatch(r"\(?([0-9+]+)\)?/([0-9]+)", s)
    if m:  # ("2+3/8" is abc2midi's 5/8)
        num, den = sum(int(x) for x in m.group(1).split("+")), int(m.group(2))
    pat = _GCHORD_PATTERNS.get((num, den))
    if pat is None:
        return False
    slot = Fraction(num, den) / len(pat)
    k = (t % Fraction(num, den)) / slot
    return k.denominator != 1 and pat[int(k)] != "z"


def _key_mode(v: str) -> str | None:
    """The mode of a complete K: value ("maj", "min", "dor" ...); "none" for K:none / K:HP; None if unreadable."""
    s = v.strip()
    if s.lower() in ("none", "hp"):
        return "none"
    k = normalise_key(s)
    if k:
        return k[1]
    m = re.fullmatch(r"[A-G][#b]?(\s.*)", s)  # no mode word, then clef / exp words: "G bass", "D exp ^f" (major)
    return "maj" if m and all(_KEY_WORD.fullmatch(w) for w in m.group(1).split()) else None


# what may follow a K: value's key and mode, word by word, as abc2midi 4.84 reads it (music21 writes "bass",
# "treble8"): a lower-case word ("bass", "exp"; an unknown one is only warned about), a clef with an octave
# digit or "+8"/"-8", an accidental of "exp" ("^f"), or one of the "name=value" pairs it reads ("clef=bass",
# "octave=-1", "middle=B"). A later word that starts with a note letter is read as another key ("K:D maj G:"
# is its error "Unknown mode ':'"); "-8va", "x1", "stafflines=4", "middle=3", "m=1" are its microtone error.
_KEY_WORD = regex.compile(
    r"[a-z]+|(?:treble|bass|alto|tenor|baritone|soprano|mezzosoprano|perc)(?:[1-5]|[+-]?8)|[_^=]{1,2}[A-Ga-g]"
    r"|clef=[a-z]+(?:[1-5]|[+-]?8)?|octave=[+-]?[0-9]|transpose=[+-]?[0-9]{1,2}|middle=[A-Ga-g][,']{0,2}"
    r"|(?:name|sname|stem|gstem|cue)=[a-z]+")


def _key_words_ok(after: str) -> bool:
    """Whether ``after`` (what follows the key and its mode word, from a space on) is a valid run of
    further words so far: each whole word in :data:`_KEY_WORD`, the last one a prefix of one."""
    if after[:1] in ("_", "^", "="):  # "K:Dmix=c": an accidental may follow the mode word directly
        after = " " + after
    if not after.startswith(" "):
        return False
    *whole, last = after[1:].split(" ")
    return all(not w or _KEY_WORD.fullmatch(w) for w in whole) and (
        not last or _KEY_WORD.fullmatch(last, partial=True) is not None)


def _key_prefix_ok(v: str, mode: str | None = None) -> bool:
    """Whether ``v`` can still be completed to a valid K: value (of ``mode`` when given)."""
    s = v.lstrip(" ")
    if not s:
        return True
    if mode is None and any(w.startswith(s.lower()) for w in ("none", "hp")):
        return True
    m = re.fullmatch(r"([A-G])([#b]?)(.*)", s)
    if not m:
        return False
    rest = m.group(3)
    word_m = re.match(r"\s?([A-Za-z]*)", rest)
    word = word_m.group(1)
    w = word.lower()
    if word and not (w in MODES or w[:3] in MODES or any(x.startswith(w) for x in _MODE_WORDS)):
        word = w = ""                          # no mode word (major): "K:G bass", "K:D exp ^f"
    after = rest[word_m.end():] if word else rest  # (no mode word: "K:D =c" keeps its space)
    if after:                                  # "Dm exp ^f", "E phr -8va", "D =c": the mode word is complete
        if word and not (w in MODES or w[:3] in MODES):
            return False
        if not word and after[:1] in ("_", "^", "="):
            return False                       # ("K:C^A" is abc2midi's "Unknown mode '^A'"; "K:Dmix=c" is fine)
        if mode is not None and MODES.get(w, MODES.get(w[:3])) != mode:
            return False
        return _key_words_ok(after)
    if mode is None:
        return any(x.startswith(w) for x in _MODE_WORDS) or w[:3] in MODES or word == ""
    return any(x.startswith(w) and MODES[x] == mode for x in _MODE_WORDS) or MODES.get(w[:3]) == mode


def validate_fields(fields: dict) -> dict:
    """Checks a request; returns the fields the constraint enforces. Raises :class:`ConstraintError`
    naming the field for a value no tune can have (``M:0/4``, ``L:1/0``, an unknown key)."""
    out = {}
    for k, v in (fields or {}).items():
        if v is None or v == "":
            continue
        v = str(v).strip()
        if k == "M":
            if not _meter_ok(v):
                raise ConstraintError(f"field M:{v}: not a meter; use e.g. M:6/8, M:C, M:C| or M:none "
                                      "(numerator and denominator must be positive)")
        elif k == "L":
            if not _unit_ok(v):
                raise ConstraintError(f"field L:{v}: not a unit note length; use L:1/N with N = 1, 2, 4 ... 64 "
                                      "(e.g. L:1/8)")
        elif k == "K":
            if _key_mode(v) is None:
                raise ConstraintError(f"field K:{v}: unknown key; use e.g. K:D, K:Em, K:Ador, K:F#m, K:Bb or K:none")
        elif k == "mode":
            if v not in set(MODES.values()):
                raise ConstraintError(f"field mode={v}: unknown mode; use one of {sorted(set(MODES.values()))}")
        elif k in CONSTRAINED_FIELDS:
            if "\n" in v or "%" in v:
                raise ConstraintError(f"field {k}:{v!r}: a header value cannot hold a newline or '%'")
        else:
            raise ConstraintError(f"field {k!r}: not one the constraint supports ({', '.join(CONSTRAINED_FIELDS)}, mode)")
        out[k] = v
    if "K" in out and "mode" in out:
        got = _key_mode(out["K"])
        if got != out["mode"]:
            raise ConstraintError(f"field K:{out['K']} is {got}, but mode={out['mode']} was asked")
        del out["mode"]
    return out


# ------------------------------------------------------------------------- prompt -> fields

_RHYTHMS = ("slip jig", "single jig", "double jig", "hop jig", "set dance", "barn dance", "barndance", "jig",
            "reel", "hornpipe", "polka", "waltz", "march", "strathspey", "mazurka", "slide", "schottische",
            "minuet", "gavotte", "bourree", "country dance", "quadrille", "polska", "air")
# a meter is forced from the rhythm alone only where the rhythm has one meter in practice; a jig may be 6/8
# or 12/8, a reel 4/4, 2/2 or C|, a hornpipe 4/4 or 2/4, a polka/march 2/4 or 6/8: those force nothing
_RHYTHM_METER = {"slip jig": "9/8", "hop jig": "9/8", "waltz": "3/4", "mazurka": "3/4", "minuet": "3/4",
                 "slide": "12/8"}
_MODE_ABBR = {"major": "", "minor": "m", "mixolydian": "mix", "dorian": "dor", "phrygian": "phr",
              "lydian": "lyd", "locrian": "loc", "aeolian": "m", "ionian": "", "maj": "", "min": "m", "m": "m",
              "mix": "mix", "dor": "dor", "phr": "phr", "lyd": "lyd", "loc": "loc", "aeo": "m", "ion": ""}
_KEY_PHRASE = (r"(?P<tonic>[A-G])(?:\s*(?P<acc>#|b|♯|♭|-?sharp|-?flat|\s+sharp|\s+flat))?"
               r"(?:\s*(?P<mode>major|minor|mixolydian|dorian|phrygian|lydian|locrian|aeolian|ionian"
               r"|maj|min|mix|dor|phr|lyd|loc|aeo|ion|m)\b)?")


def _key_from(m: re.Match) -> str:
    acc = (m.group("acc") or "").strip().lstrip("-").lower()
    acc = {"#": "#", "♯": "#", "sharp": "#", "b": "b", "♭": "b", "flat": "b"}.get(acc, "")
    return m.group("tonic") + acc + _MODE_ABBR[(m.group("mode") or "major").lower()]


def _sft_template_patterns() -> list[tuple[re.Pattern, tuple[str, ...]]]:
    """The project's own text->music SFT templates (data_preprocess.sft.T2M) as regexes, so every
    prompt they make gives back exactly the fields it was made from."""
    from data_preprocess.sft import T2M

    pats = []
    for tpl, _req in T2M:
        names = []
        rx = ""
        for part in re.split(r"(\{[a-z_]+\})", tpl):
            if part.startswith("{") and part.endswith("}"):
                name = part[1:-1]
                names.append(name)
                rx += f"(?P<{name}>.+?)" if name != "title" else f"(?P<{name}>.+)"
            else:
                rx += re.escape(part)
        pats.append((re.compile(rx + r"\s*$", re.DOTALL), tuple(names)))
    return pats


_SFT_PATTERNS: list | None = None


def _key_description(desc: str) -> str | None:
    m = re.fullmatch(r"\s*" + _KEY_PHRASE + r"\s*", desc)
    return _key_from(m) if m else None


def extract_fields(prompt: str) -> dict:
    """Header fields a request asks for: ``{"K": "D", "M": "6/8", "L": "1/8", "T": "...", "R": "jig",
    "O": "...", "mode": "min"}`` (only those it states; when unsure nothing is forced).

    Understood, in this order: ABC header lines in the prompt (``M:6/8``); the project's SFT templates
    (data_preprocess.sft.T2M, matched exactly); ChatMusician-style "Meter C / Key D / Note Length 1/8 /
    Rhythm reel" (with or without colons); plain English: "in G", "in the key of E minor", "F sharp
    minor", "in 6/8 time", "time signature 3/4", "common time" (C), "cut time" (C|), "called The Kesh" /
    titled "..." , "a reel", "minor key" (a minor mode, any tonic). A rhythm word sets ``R:`` and forces
    a meter only where it has one in practice (slip/hop jig 9/8, waltz/mazurka/minuet 3/4, slide 12/8);
    a jig (6/8 or 12/8), reel (4/4, C|), hornpipe or polka forces none."""
    global _SFT_PATTERNS
    text = prompt.strip()
    out: dict[str, str] = {}
    # 1. ABC header lines (raw continuation of a header, or fields pasted into the request)
    head_lines = [ln for ln in text.splitlines() if re.match(r"^[A-Za-z]:", ln.strip())]
    if any(ln.startswith(("X:", "K:", "M:", "L:")) for ln in head_lines):
        header, _ = split_header_body(text[text.find("X:"):] if "X:" in text else text)
        for k in CONSTRAINED_FIELDS:
            if header.get(k):
                out[k] = header[k]
        return out
    # 2. the project's SFT templates
    if _SFT_PATTERNS is None:
        _SFT_PATTERNS = _sft_template_patterns()
    for rx, names in _SFT_PATTERNS:
        m = rx.match(text)
        if not m:
            continue
        got = {}
        for n in names:
            v = m.group(n).strip()
            if n == "key":
                k = _key_description(v)
                if k is None:
                    break
                got["K"] = k
            elif n == "meter":
                got["M"] = v
            elif n == "a_rhythm":
                got["R"] = re.sub(r"^an?\s+", "", v)
            elif n == "title":
                got["T"] = v
            elif n == "origin":
                got["O"] = v
        else:
            return got
    # 3. ChatMusician-style field lists and plain English
    low = text
    m = re.search(r"(?i)\b(?:note length|unit note length|default note length|L)\s*(?:of\s*|:\s*|\s)\s*([0-9]+/[0-9]+)", low)
    if m:
        out["L"] = m.group(1)
        low = low[:m.start()] + " " * (m.end() - m.start()) + low[m.end():]
    m = (re.search(r"(?i)\b(?:meter|time signature|time|M)\s*(?:of\s*|:\s*|\s)\s*(C\||C\b|[0-9]+/[0-9]+)", low)
         or re.search(r"(?i)\b([0-9]+/[0-9]+)\s*(?:time|meter|signature)\b", low)
         or re.search(r"(?i)\bin\s+([0-9]+/[0-9]+)\b", low)
         or re.search(r"(?i)\b([0-9]+/[0-9]+)\s+(?:" + "|".join(_RHYTHMS) + r")\b", low)
         # a bare fraction that can only be a meter (a note length would be 1/8, 1/16 ...)
         or re.search(r"(?<![/0-9])([2-9]/[248]|1[0-2]/[248])(?![/0-9])", low))
    if m:
        out["M"] = m.group(1).upper() if m.group(1)[0] in "cC" else m.group(1)
    elif re.search(r"(?i)\bcommon time\b", low):
        out["M"] = "C"
    elif re.search(r"(?i)\b(?:cut time|alla breve)\b", low):
        out["M"] = "C|"
    end = r"(?![A-Za-z#/|])"
    m = (re.search(r"(?i:\bkey(?:\s+of)?\s*:?\s*)" + _KEY_PHRASE + end, text)
         or re.search(r"\b(?i:in(?:\s+the\s+key\s+of)?)\s+" + _KEY_PHRASE + end, text)
         or next((x for x in re.finditer(r"\b" + _KEY_PHRASE + end, text) if x.group("mode")
                  and x.group("mode") != "m"), None))
    if m:
        out["K"] = _key_from(m)
    elif re.search(r"(?i)\bminor\s+(?:key|mode|tonality)\b|\bin\s+(?:a\s+)?minor\b", text):
        out["mode"] = "min"
    elif re.search(r"(?i)\bmajor\s+(?:key|mode|tonality)\b|\bin\s+(?:a\s+)?major\b", text):
        out["mode"] = "maj"
    m = (re.search(r"(?i)\brhythm\s*:?\s*([A-Za-z][A-Za-z -]*?)\s*(?:$|[.,;/\n])", text)
         or re.search(r"(?i)\b(?:an?|the|this|some)\s+(?:[a-z]+\s+)??(" + "|".join(_RHYTHMS) + r")s?\b", text))
    if m:
        out["R"] = m.group(1).strip().lower()
        if "M" not in out and out["R"] in _RHYTHM_METER:
            out["M"] = _RHYTHM_METER[out["R"]]
    m = (re.search(r"(?i)\b(?:called|titled|entitled|named|title)\s*:?\s*[\"“'‘]([^\"”’\n]+)[\"”’]", text)
         or re.search(r"\b(?i:called|titled|entitled|named)\s+((?:[A-Z0-9][\w'’-]*)(?:\s+(?:[A-Z0-9][\w'’-]*|(?:of|the|"
                      r"a|an|and|de|la|le|na)(?=\s+[A-Z0-9])))*)", text))
    if m:
        out["T"] = m.group(1).strip()
    return out


# ------------------------------------------------------------------------------------ the machine


class AbcState:
    """One position in an ABC tune being written: feed it characters with :meth:`feed` (True = still a
    valid prefix). Text is processed as latin-1 code points of its UTF-8 bytes, one char per byte, so
    byte-fallback tokens and multi-byte characters compare exactly. A state is never changed once it is
    shared: :meth:`after` returns a new one."""

    __slots__ = (
        "_key",
        "acc",
        "after_bar",
        "bar_exp",
        "bdir",
        "bk",
        "blank",
        "broken_next",
        "buf",
        "bwant",
        "chord_first",
        "chord_n",
        "chord_pitches",
        "chord_tied",
        "closed",
        "colon_closed",
        "deco",
        "done",
        "dur",
        "empties",
        "fctx",
        "fletter",
        "fval",
        "gch",
        "hseen",
        "hurry",
        "idle",
        "in_chord",
        "just",
        "last_full",
        "lastbar",
        "last_pitches",
        "layers",
        "lbad",
        "lbase",
        "lden",
        "left",
        "lnum",
        "lrun",
        "lsl",
        "ltarget",
        "meter",
        "meter_str",
        "mode",
        "multi",
        "n",
        "nl_note",
        "nbars",
        "need_boundary",
        "owe_boundary",
        "paired",
        "parts",
        "phase",
        "pickup",
        "pitch",
        "pitched",
        "plen",
        "pre_lines",
        "prev",
        "rep_closed",
        "rep_open",
        "replay",
        "shorts",
        "slur",
        "spec",
        "stacc",
        "spec_key",
        "tbuf",
        "tonic",
        "textrun",
        "tied",
        "tup_factor",
        "tup_left",
        "u8",
        "unit",
        "var",
        "wlen",
        "x_seen",
    )

    def __init__(self, spec: dict | None = None):
        self.spec = {k: to_machine_text(v) for k, v in (spec or {}).items()}
        self.spec_key = tuple(sorted(self.spec.items()))  # part of key(): rows of a batch share the caches
        self.mode = "pre"
        self.phase = "pre"
        self.x_seen = False
        self.done = frozenset()
        self.fletter = ""
        self.fval = ""
        self.fctx = "h"
        self.meter: Fraction | None = None
        self.meter_str: str | None = None
        self.unit = Fraction(1, 8)
        self.dur = Fraction(0)
        self.n = 0
        self.bar_exp: Fraction | None = None
        self.layers = Fraction(0)
        self.left = "start"
        self.pickup: Fraction | None = None
        self.nbars = 0
        self.last_full = False
        self.need_boundary = False
        self.owe_boundary = False
        self.closed = False
        self.after_bar = False
        self.multi = False
        self.tup_left = 0
        self.tup_factor = Fraction(1)
        self.tbuf = ""
        self.slur = 0
        self.broken_next: Fraction | None = None
        # abc2midi's rules beyond bar time: the two notes of a broken pair are written with the same
        # length and the second starts no new pair ("A>B2", "A>B>c" are its errors); a repeat opened by
        # "|:" or "::" is closed by ":|" before the tune ends and is not opened twice; numbered endings
        # (each rule found by feeding abc2midi 4.84 the cases; tests/test_abc_constraint.py keeps them).
        self.wlen: Fraction | None = None   # the last note's written length (before broken/tuplet factors)
        self.bwant: Fraction | None = None  # the written length the note after ">" must have
        self.paired = False                 # the last note was the second of a broken pair
        self.rep_open = False
        self.rep_closed = False             # a ":|" closed a repeat and no "|:" / "||" came since
        self.colon_closed = False           # a ":|" (or ":|:") came and no "|:" since: "::" is abc2midi's
        #                                     error "found :: before |:" (even after "||")
        # numbered endings: 0 none open; 1 a first ending, closed by ":|" before the tune may end; 2 it was
        # closed (a later ending may follow that ":|"); 3 in a later ending (a section barline ends the set).
        # An ending starts right after "|" or ":|" ("||1" "::1" "|]1" are abc2midi errors) or as "[2".
        self.var = 0
        # a header "P:" is a part order for abc2midi ("P:ABA": play part A, B, A; see _PART_ORDER), and every
        # part it names must be labelled in the body ("P:A" line or "[P:A]": the label's first letter) before
        # the end ("Part not defined"). ``parts`` holds the named parts not yet labelled.
        self.parts: frozenset = frozenset()
        self.gch = False                    # a chord symbol was written: abc2midi plays an accompaniment
        self.tonic = "z"                    # the key's tonic letter (a steered ending closes on it), else a rest
        # ties (abc2midi: "Could not find note to be tied" unless the next note, or chord, holds the tied pitch;
        # a rest, a grace note, "&" or the end after a tie are its errors; an accidental carries over the tie,
        # "^A-|A" is fine, "A-^A" is not). A pitch is (accidental, letter + octave marks).
        self.pitch: tuple[str, str] | None = None   # the note being written, once its letter is known
        self.last_pitches: frozenset = frozenset()  # the pitches of the last note or chord (empty: a rest)
        self.tied: frozenset = frozenset()          # pitches the next note or chord must hold (a "-" is open)
        self.chord_pitches: frozenset = frozenset() # the chord being written
        self.chord_tied: frozenset = frozenset()    # its notes tied inside it ("[A-C-]")
        self.pitched = False                # a pitched note was written (a tune of rests alone may not end:
        #                                     abc2midi plays it as silence and inference.abc_extract finds no tune)
        self.lastbar = ""
        self.bk = 0
        self.bdir = ""
        self.prev: Fraction | None = None
        self.just = False
        self.lnum = ""
        self.lsl = 0
        self.lden = ""
        self.ltarget = ""
        self.lbase = Fraction(1)
        self.acc = ""
        self.in_chord = False
        self.chord_first: Fraction | None = None
        self.chord_n = 0
        self.buf = ""
        self.plen = 0
        self.replay = False
        self.u8 = 0
        self.deco = 0
        self.stacc = False      # the last note had a staccato: abc2midi cannot tie it
        self.lrun = 0           # letters in a row in the music (notes, rests, decorations) ...
        self.lbad = 0           # ... and how many of them are no note or rest (_prose_run)
        self.pre_lines = 0
        self.hseen = ""         # the header's field letters so far (music21: T: 6 times at most, N: 14)
        # Set by the processor once a header has used its share of the token budget (a model can fill a
        # whole budget with "T:T:T:..." or "B: G" lines and never reach K:): from then on only the asked
        # fields and K: may start a line, and an unasked value ends within _MAX_HURRIED_VALUE chars.
        self.hurry = False
        # Idle content since the last note or rest: a model can stay inside the grammar forever without
        # writing music ("| | |", line after line of N: text, "G" "A" "B" quotes, "u(v.u(v.", "\\" lines).
        # Caps measured on music21's 12,868 tunes: EsAC incipits open with up to 4 empty bars
        # (" |  |  |  | D3E |"), 113 tunes have one body text line between notes and one has 2, 54 places
        # have 2 quoted strings in a row, alignment runs of spaces/backticks reach ~130. With the caps, one
        # tune more of the whole corpus is refused than without them (5 empty bars at its end).
        self.empties = 0        # barlines since the last note
        self.shorts = 0         # short bars in a row (a short bar before a section barline, then a pickup)
        self.textrun = 0        # body field / comment lines since the last note
        self.idle = 0           # quotes, decorations, slurs, ties, K:/M:/L:/V: changes since the last note
        self.blank = 0          # spaces, tabs, ` \ $ y * and line ends since the last note
        self.nl_note = False    # a note since the last line end (a music line with none counts as text)
        self._key = None

    # -- copying / caching ---------------------------------------------------------------------
    def clone(self) -> AbcState:
        o = AbcState.__new__(AbcState)
        for s in AbcState.__slots__:
            setattr(o, s, getattr(self, s))
        o._key = None
        return o

    def key(self) -> tuple:
        if self._key is None:
            self._key = tuple(getattr(self, s) for s in _KEY_SLOTS)
        return self._key

    def after(self, text: str) -> AbcState | None:
        """A new state after ``text`` (latin-1 chars of UTF-8 bytes), or None if it is not allowed."""
        s = self.clone()
        for c in text:
            if not s.feed(c):
                return None
        return s

    # -- the end -----------------------------------------------------------------------------------
    def can_end(self) -> bool:
        """EOS allowed: after a barline that closed a complete bar, nothing left open."""
        if self.phase == "end":
            return True
        if self.mode == "bar" and "|" not in self.buf and "::" not in self.buf:
            return False  # (a lone ":" is no barline)
        return (self.phase == "body" and self.mode in ("music", "b_start", "bar", "comment") and self.n == 0
                and not self.multi and self.after_bar and self.nbars > 0 and self.last_full and self.slur == 0
                and self.pitched and not self.tied and not self.parts
                and self.tup_left == 0 and self.broken_next is None and not self.owe_boundary
                and not self._repeat_open())

    def _repeat_open(self) -> bool:
        """A repeat or first ending still waits for its ":|" (counting a barline being written as ended)."""
        rep, var = self.rep_open, self.var
        if self.mode == "bar":
            if self.buf.startswith(":"):
                rep, var = False, (2 if var == 1 else var)
            if "::" in self.buf or ":" in self.buf.partition("|")[2]:
                rep = True
        return rep or var == 1

    def describe(self) -> str:
        return (f"phase={self.phase} mode={self.mode} bar={self.dur}/{self.bar_exp or self.meter} notes={self.n} "
                f"open: slur={self.slur} tuplet={self.tup_left} field={self.fletter or '-'}")

    def finish_text(self, final: str = "|]") -> str | None:
        """The shortest plain ending from here, where nothing is open: the bar filled with one note on the
        tonic (a rest in a key without one), then ":|" if a repeat waits for it, else ``final``; then, for
        each part the header's P: names and the body has not labelled, "[P:X]" and one such bar (abc2midi:
        "Part not defined"). None where that cannot be written (a tuplet or a broken pair pending, a length
        no ABC note has)."""
        f = self._finish_bar(final)
        if f is None or not self.parts:
            return f
        note = self.tonic if self.pitched or self.tonic != "z" else "C"
        bar = note if self.meter is None else _fill(note, self.meter / self.unit)
        if bar is None:
            return None
        return f + "".join(f"[P:{p}]{bar}{final}" for p in sorted(self.parts))

    def _finish_bar(self, final: str) -> str | None:
        """finish_text's first part: the bar filled, then ":|" or ``final``."""
        if (self.phase != "body" or self.mode not in ("music", "b_start", "bar") or self.tup_left or self.deco
                or self.broken_next is not None or self.in_chord or self.layers or self.owe_boundary or self.multi):
            return None
        close = ":|" if self._repeat_open() else final
        pre = ")" * self.slur
        note = self.tonic if self.pitched or self.tonic != "z" else "C"  # (a tune of rests ends on a note)
        if self.tied:  # the filling note is the one the tie waits for
            note = "".join(a + sp for a, sp in sorted(self.tied))
            if len(self.tied) > 1:
                note = f"[{note}]"
            if self.mode != "bar" and self.n > 0 and self.bar_exp is not None and self.dur == self.bar_exp:
                pre += "|"  # the bar is full: the tie goes over a barline into a bar of its note
                if self.meter is None:
                    return None
                bar = _fill(note, self.meter / self.unit, tie=True)
                return pre + bar + close if bar else None
        if self.mode == "bar":
            if not self.buf.endswith("|") or self.meter is None:
                return None
            pre, rest = " " + pre, self.meter
        else:
            exp = self.bar_exp if self.n > 0 else self.meter
            if exp is None:  # free meter
                if self.tied:
                    return pre + note + close
                return pre + close if self.n > 0 else None
            rest = exp - self.dur
        if rest == 0:
            return pre + close
        if rest < 0:
            return None
        bar = _fill(note, rest / self.unit, tie=bool(self.tied))
        return pre + bar + close if bar else None

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, c: str) -> bool:
        o = ord(c)
        if o >= 128:  # UTF-8 must stay well formed (RFC 3629), so the decoded reply is the text checked here
            if self.u8:
                lo, hi = self.u8 >> 16, (self.u8 >> 8) & 0xFF
                if not lo <= o <= hi:
                    return False
                n = (self.u8 & 0xFF) - 1
                self.u8 = (0x80 << 16 | 0xBF << 8 | n) if n else 0
            elif 0xC2 <= o <= 0xDF:
                self.u8 = 0x80 << 16 | 0xBF << 8 | 1
            elif 0xE0 <= o <= 0xEF:  # no overlong forms (E0 A0..), no surrogates (ED ..9F)
                lo, hi = (0xA0 if o == 0xE0 else 0x80), (0x9F if o == 0xED else 0xBF)
                self.u8 = lo << 16 | hi << 8 | 2
            elif 0xF0 <= o <= 0xF4:  # nothing past U+10FFFF
                lo, hi = (0x90 if o == 0xF0 else 0x80), (0x8F if o == 0xF4 else 0xBF)
                self.u8 = lo << 16 | hi << 8 | 3
            else:
                return False
        elif self.u8 or (o < 32 and c not in "\n\t") or o == 127:
            return False
        if self.lrun and not ("A" <= c <= "Z" or "a" <= c <= "z"):
            self.lrun = self.lbad = 0  # (a letter run ends: see _prose_run)
        for _ in range(8):
            r = _STEP[self.mode](self, c)
            if r is not None:
                return r
        return False  # pragma: no cover - a mode that keeps handing the char on is a bug

    # header ------------------------------------------------------------------------------------
    def _pre(self, c):
        """Before the tune: at most one short line of text (a chat reply's "Here it is:"), then ``X:``
        at the start of a line."""
        if c == "X" and self.plen == 0:
            self.phase, self.mode, self.fletter = "header", "h_letter", "X"
            return True
        if c == "\n":
            if self.plen:
                self.pre_lines += 1
            self.plen = 0
            return self.pre_lines <= 1
        if self.pre_lines >= 1 or not (" " <= c <= "~" or c >= "\x80"):
            return False
        if self.plen == 1 and c == ":" and "A" <= self.buf <= "z":
            return False  # a line that looks like a header field is the header: X: comes first
        self.plen += 1
        if self.plen == 1:
            self.buf = c
        return self.plen <= _MAX_PREAMBLE or "\x80" <= c <= "\xbf"  # a started character may end

    def _h_start(self, c):
        if c == "%":
            self.mode, self.fctx, self.plen = "comment", "h", 0
            return True
        if c not in _HEADER_LETTERS:
            return False
        if not self.x_seen:
            if c != "X":
                return False
        elif c == "X" or (c in "ML" and c in self.done):
            return False
        missing = [k for k in self.spec if k not in ("K", "mode") and k not in self.done]
        if c == "K" and missing:
            return False
        if self.x_seen and (self.nbars >= _MAX_HEADER_LINES or self.hurry) and c != "K" and c not in missing:
            return False  # a header that goes on and on: only the asked fields and K: may come now
        if self.hseen.count(c) >= (16 if c == "N" else 1 if c == "P" else 6):
            return False  # (one part order)
        self.hseen += c
        self.nbars += 1  # (counts header lines until the body starts)
        self.mode, self.fletter = "h_letter", c
        return True

    def _h_letter(self, c):
        if c != ":":
            return False
        self.mode, self.fval, self.fctx = "value", "", "h"
        return True

    def _value(self, c):
        inline = self.fctx == "i"
        if c == "\n" or (inline and c == "]"):
            if inline and c == "\n":
                return False
            return self._field_done()
        if inline and c in "[%":
            return False  # (a comment cannot start inside [K:...]: the field would never close)
        L = self.fletter
        if c in " \t" and len(self.fval) >= _MAX_LEADING_BLANKS and not self.fval.strip(" \t"):
            return False  # (a value of blanks alone never ends: "K:" + 180 spaces spent a whole budget)
        cap = _MAX_HURRIED_VALUE if (self.hurry and self.fctx == "h" and L not in self.spec) else _MAX_VALUE
        if len(self.fval) >= cap and not "\x80" <= c <= "\xbf" and self.clone()._field_done():
            return False  # (past the cap only what completes the value: a quote, group or word left open)
        v = self.fval + c
        if c == "%" and L in "MLK" and "%" not in self.fval:  # a comment only after a whole value
            head = self.fval.strip()
            want = self.spec.get("mode") if self.fctx == "h" else None
            if not (_meter_ok(head) if L == "M" else _unit_ok(head) if L == "L"
                    else _key_mode(head) is not None and want in (None, _key_mode(head))):
                return False
        if self.fctx == "h" and L in self.spec and L not in self.done:
            if not _requested_prefix_ok(v, self.spec[L]):
                return False
        elif L == "X":
            if re.fullmatch(r" ?[0-9]{0,6}", v) is None:
                return False
        elif L == "P" and self.fctx == "h":
            head, pct, _ = v.partition("%")
            if _PART_ORDER.fullmatch(head, partial=not pct) is None:
                return False
        elif L == "Q":
            head, pct, _ = v.partition("%")
            if not (_tempo_ok(head) if pct else _tempo_prefix_ok(head)):
                return False
        elif L in "MLK" and "%" not in v:
            if L == "M" and not _meter_prefix_ok(v):
                return False
            if L == "L" and not _unit_prefix_ok(v):
                return False
            mode = self.spec.get("mode") if (L == "K" and self.fctx == "h") else None
            if L == "K" and not _key_prefix_ok(v, mode):
                return False
        self.fval = v
        return True

    def _field_done(self) -> bool:
        L, raw, ctx = self.fletter, self.fval, self.fctx
        v = raw.split("%", 1)[0].strip()
        if ctx == "h" and L in self.spec and L not in self.done and v != self.spec[L]:
            return False
        if L == "X" and not re.fullmatch(r"[0-9]+", v):
            return False
        if L == "Q" and not _tempo_ok(raw.split("%", 1)[0]):
            return False
        if L == "P" and ctx == "h" and _PART_ORDER.fullmatch(raw.split("%", 1)[0]) is None:
            return False
        if L == "M":
            if not _meter_ok(v):
                return False
            self.meter_str = v
            self.meter = meter_value(v)
        elif L == "L":
            if not _unit_ok(v):
                return False
            unit = Fraction(*map(int, v.split("/")))
            if ctx != "h" and self.n > 0 and self.bar_exp is not None:
                rest = self.bar_exp - max(self.dur, self.layers)  # (mid-bar: the rest of the bar must stay
                if rest > 0 and (rest / (unit * _MIN_LENGTH)).denominator != 1:  # writable in the new unit, or
                    return False                                  # the bar can never be completed)
            self.unit = unit
        elif L == "K":
            mode = _key_mode(v)
            if mode is None or (ctx == "h" and "mode" in self.spec and mode != self.spec["mode"]):
                return False
            self.tonic = v[0].upper() if v[:1] and v[0].upper() in "ABCDEFG" else "z"
        elif L == "V" and ctx != "h" and not self._voice_change():
            return False
        elif L == "P":
            if ctx == "h":
                self.parts = frozenset(re.findall(r"[A-Z]", v))
            elif v:
                self.parts = self.parts - {v[0]}
        if ctx == "h":
            self.done = self.done | {L}
            if L == "X":
                self.x_seen = True
            self.fletter = ""
            if L == "K":
                self.phase, self.nbars = "body", 0
                if "L" not in self.done:
                    self.unit = Fraction(1, 16) if (self.meter is not None and self.meter < Fraction(3, 4)) \
                        else Fraction(1, 8)
                self.mode = "b_start"
            else:
                self.mode = "h_start"
            return True
        self.fletter = ""
        if ctx == "i":
            self.mode = "music"
        else:
            self.mode = "b_start"
        return True

    def _comment(self, c):
        if c != "\n":
            self.plen += 1  # (the comment's length; plen is free once the tune has begun)
            return self.plen <= _MAX_COMMENT or "\x80" <= c <= "\xbf"
        self.plen = 0
        self.mode = "h_start" if self.fctx == "h" else "b_start"
        return True

    # body lines --------------------------------------------------------------------------------
    def _b_start(self, c):
        if c not in "<>":
            self.just = False  # only a broken rhythm continues the last line's note (a tie does not: abc2midi
            #                    "Cannot find note before tie"), and nothing after a field or comment line
        if c == "\n":  # a blank line ends the tune
            if not self.can_end():
                return False
            self.phase, self.mode = "end", "end"
            return True
        if c == "%":
            return self._text_line()
        if c in _BODY_FIELDS or c in _DECORATIONS:
            # decided here, not a char later, so no state is left with nothing allowed after it: the letter
            # starts a field line only while the caps allow one, music only where a decoration may come
            field = self._field_may_start(c)
            music = not self.owe_boundary and c in _DECORATIONS and self.idle < _MAX_IDLE and self._room()
            if not (field or music):
                return False
            self.mode, self.buf = "b_letter", c
            return True
        self.mode = "music"
        return None

    def _field_may_start(self, c: str) -> bool:
        """A body field line ``c:`` is allowed here: a body field, within the cap on lines without music (K: L:
        M: V: count too, up to _MAX_FIELD_LINES: a section may change M:, L: and K: at once; music21 has 2 in a
        row at most) and, for K: L: M: V:, the idle cap."""
        if c in "KLMV":
            if c == "V" and self.tied:
                return False  # (a tie waits for a note of this voice)
            return self.textrun < _MAX_FIELD_LINES and self.idle < _MAX_IDLE
        return c in _BODY_FIELDS and self.textrun < _MAX_TEXT_LINES

    def _b_letter(self, c):
        if c == ":":
            if not self._field_may_start(self.buf):
                return False  # "J:", "C:" ... are header-only fields; past the caps "T:" is no field (nor "T" ":")
            self.mode = "b_colon"
            return True
        return self._replay(self.buf, c)

    def _b_colon(self, c):
        if c in "|:":
            return self._replay(self.buf + ":", c)
        if self.buf in "KLMV":  # a change of key, meter, length or voice: music, but it writes none
            self.textrun += 1   # (a line of its own: music21 has 2 such lines in a row at most)
            if not self._idle():
                return False
        elif not self._text_line():
            return False
        self.mode, self.fletter, self.fval, self.fctx = "value", self.buf, "", "b"
        return None

    def _text_line(self) -> bool:
        """A body field line or a comment line starts (``mode`` becomes the comment; a field sets its own)."""
        self.textrun += 1
        if self.textrun > _MAX_TEXT_LINES:
            return False
        self.mode, self.fctx, self.plen = "comment", "b", 0
        return True

    def _replay(self, text: str, c: str) -> bool:
        """A line-start letter that turned out to be music (``T:|`` = trill + ``:|``)."""
        self.mode = "music"
        for ch in text:
            if not self.feed(ch):
                return False
        return self.feed(c)

    def _end(self, c):
        return c in " \n\t"

    # music -------------------------------------------------------------------------------------
    def _room(self, length: Fraction = _MIN_LENGTH, tail: bool = True) -> bool:
        """Whether a note of at least ``length`` units (times the broken-rhythm and tuplet factors) still
        fits the bar, leaving the shortest time the rest of an open tuplet needs (``tail``)."""
        if self.owe_boundary or self.multi:
            return False
        exp = self.bar_exp if self.n > 0 else self.meter
        if exp is None:
            return True
        d = self.unit * length
        if self.broken_next is not None:
            d *= self.broken_next
        rest = 0
        if self.tup_left > 0:
            d *= self.tup_factor
            rest = self.tup_left - 1 if tail else 0
        return self.dur + d + rest * self.unit * self.tup_factor * _MIN_LENGTH <= exp

    def _min_length(self) -> Fraction:
        """The shortest length the note being written can still get (its length so far is a prefix)."""
        n = int(self.lnum) if self.lnum else 1
        if self.lsl == 0:
            return Fraction(n, _MAX_DEN) if n <= _MAX_SLASHED else Fraction(n)  # (no "/" after 8..32)
        if self.lsl == 1:
            if not self.lden:
                return Fraction(n, _MAX_DEN)
            return Fraction(n, max(int(d) for d in _DENOMINATORS if d.startswith(self.lden)))
        return Fraction(n, 8)

    def _prose_run(self, c: str) -> bool:
        """Counts a letter of music (a note, rest or decoration letter) into the run of letters it is in, and
        whether the run now reads as a word of prose to ``inference.abc_extract`` (3+ letters, 2+ of them not
        notes or rests: "TCHERFEDERHASSD" is a decorated note run to abc2midi, and no tune to the
        extractor, which then finds no tune in the reply)."""
        self.lrun += 1
        self.lbad += c not in _NOTE_OR_REST
        return self.lrun >= 3 and self.lbad >= 2

    def _music(self, c):
        if ("A" <= c <= "Z" or "a" <= c <= "z") and self._prose_run(c):
            return False
        just, self.just = self.just, False
        stacc = False  # the note starting here carries a staccato (set where its decorations end)
        if self.deco:  # a one-letter decoration (~ . T u ...) decorates the note, rest or chord that follows
            if c in _DECORATIONS:  # (deco: how many, and _deco_bits's flags)
                if c in _ROLLS and len(self.tied) > 1:
                    return False  # (a roll takes no chord, and only a chord holds the tied pitches)
                if self.deco & 32 and c not in _KNOWN_DECORATIONS:
                    return False  # ("OV": a letter abc2midi ignores cannot follow one it plays)
                self.deco = ((self.deco & 7) + 1) | (self.deco & 120) | _deco_bits(c)
                self.after_bar = False
                return self.deco & 7 <= 3
            if not self.deco & 32:
                if c not in _AFTER_RESERVED:
                    return False
            elif (c not in _AFTER_DECORATION and not (c == "(" and self.deco == 97)) or (c == "[" and self.deco & 8):
                return False  # (abc2midi takes ".(" -- a staccato, then a slur -- but no other decoration there)
            stacc, self.deco = bool(self.deco & 64), 0
            if c == "[":  # a chord, never "[|", "[1" or "[L:...]" ("T[L:1/16]": "Malformed note")
                self.mode, self.buf, self.stacc = "lbrack", "d", False  # (abc2midi ties ".[CE]4-")
                return True
        if self.owe_boundary and c not in " \t\n|:[]%":
            return False  # a short bar closed by a plain barline: only a section barline may come now
        if c in _NOTE_LETTERS or c in "^_=":
            if not self._room():
                return False
            self.mode, self.acc, self.in_chord, self.stacc = "note", "", False, stacc
            return None
        if c in "zx":
            if self.tied or not self._room():
                return False  # (a tie into a rest)
            self.pitch = None
            self.mode, self.ltarget, self.lbase = "len", "note", Fraction(1)
            self.lnum, self.lsl, self.lden = "", 0, ""
            return True
        if c in " \t":
            self.just = just
            return self._idle("blank")
        if c == "\n":
            return self._newline(just, may_close=True)
        if c in "\\*":  # abc2midi: "'\\' in middle of line ignored", "*'s in middle of line ignored" (errors):
            self.mode, self.buf = "eol", c  # after either, only a run of '*', blanks, and the line end
            return self._idle("blank")
        if c in _NEUTRAL:
            return self._idle("blank")
        if c in _DECORATIONS:
            if not self._room() or (c in _ROLLS and len(self.tied) > 1):
                return False  # (a decoration needs a note after it; a roll takes no chord a tie may wait for)
            self.after_bar = False
            self.deco = 1 | _deco_bits(c)
            return self._idle()
        if c in "|:":
            return self._bar_open(c)
        if c == "[":
            self.mode, self.buf, self.stacc = "lbrack", "", False
            return True
        if c in '"!+':
            if not self._idle():
                return False
            self.mode, self.plen, self.after_bar = {'"': "quote", "!": "deco", "+": "pdeco"}[c], 0, False
            return True
        if c == "{":
            if self.tied:
                return False  # (the grace note would take the tie)
            self.mode, self.after_bar, self.plen, self.buf = "grace", False, 0, ""
            return self._idle()
        if c == "(":
            if self.slur >= _MAX_SLURS:  # (decided at the "(", so "(" never leads to a dead end)
                return False
            self.mode = "paren"
            return self._idle()
        if c == ")":  # a stray ')' (real tunes write "(3abc)") closes nothing
            self.slur = max(0, self.slur - 1)
            self.just = just
            return True
        if c == "-":  # a tie: right after a note or chord, the next one must hold its pitches
            if not just or not self.last_pitches or self.tied or self.stacc:  # (abc2midi ties no staccato note:
                #                                                             ".C4-" "Cannot find note before tie")
                return False
            self.just, self.tied = just, self.last_pitches
            return self._idle()
        if c in "<>":
            if not just or self.prev is None or self.paired:
                return False
            self.mode, self.bk, self.bdir, self.bwant = "broken", 1, c, self.wlen
            return self._broken_fits()
        if c == "Z":  # (X, ABC 2.1's invisible multi-bar rest: no music21 tune uses it, and lines of "X234"
            if self.n > 0 or self.owe_boundary or self.tied:  # read as new tunes to extractors)
                return False
            self.multi, self.mode, self.buf, self.after_bar = True, "mrest", "", False
            self.empties = self.textrun = self.idle = self.blank = 0
            self.nl_note = True
            return True
        if c == "&":
            if self.n == 0 or self.tied:
                return False
            self.layers = max(self.layers, self.dur)
            self.dur = Fraction(0)
            return True
        if c == "%":
            self.mode, self.fctx, self.plen = "comment", "b", 0
            return True
        return False

    def _newline(self, just: bool, may_close: bool) -> bool:
        """A music line ends. After an exactly full bar the line end stands for its barline (_line_end_bar;
        not after a '\\', which continues the line, nor a '*'); otherwise the bar goes on, and a broken rhythm may
        pair across the line end ("D>cB\n>A|"; see _b_start)."""
        if not (may_close and self._line_end_bar()):
            self.just = just
        self.mode = "b_start"
        if not self.nl_note:
            self.textrun += 1
            if self.textrun > _MAX_TEXT_LINES:
                return False
        self.nl_note = False
        return self._idle("blank")

    def _eol(self, c):
        """After a '\\' or '*' in a music line: '*' right after '*', spaces, tabs, then the line end."""
        if c == "\n":
            return self._newline(False, may_close=False)  # (benchmarks.abc_metrics: no bar at a "\\" or "*" end)
        if c in " \t" or (c == "*" and self.buf == "*"):
            self.buf = "*" if c == "*" else " "
            return self._idle("blank")
        return False

    def _idle(self, kind: str = "idle") -> bool:
        """Counts one idle char (see ``__init__``) of ``kind`` (idle | blank); False past its cap."""
        if kind == "blank":
            self.blank += 1
            return self.blank <= _MAX_BLANK
        self.idle += 1
        return self.idle <= _MAX_IDLE

    def _tie_targets(self) -> frozenset | None:
        """The tied pitches the note being written must be one of (None: any note will do): the one a single
        note's tie waits for (none fits when a chord was tied), or, in a chord, the tied pitches it does not
        hold yet once they need every slot left of its 8."""
        if not self.tied:
            return None
        if not self.in_chord:
            return self.tied if len(self.tied) == 1 else frozenset()
        missing = frozenset(t for t in self.tied
                            if not any(sp == t[1] and a in ("", t[0]) for a, sp in self.chord_pitches))
        return missing if len(missing) >= 8 - self.chord_n else None

    def _tie_target(self, acc: str, spelled: str, whole: bool) -> bool:
        """Whether a note written ``acc`` + ``spelled`` (so far, or ``whole``) can be a note a tie waits for
        (see _tie_targets): the same letter and octave marks, the tied note's accidental or none (it carries)."""
        targets = self._tie_targets()
        if targets is None:
            return True
        for tacc, tl in targets:
            if acc and not tacc.startswith(acc):
                continue
            if (tl.startswith(spelled) if not whole else (tl == spelled and acc in ("", tacc))):
                return True
        return False

    def _note(self, c):
        # accidentals, then the letter, then octave marks, then the length
        if c in "^_=":
            if self.acc and (self.acc[-1] != c or c == "=" or len(self.acc) >= 2):
                return False
            if not self._tie_target(self.acc + c, "", False):
                return False
            self.acc += c
            return True
        if c in _NOTE_LETTERS:
            if not self._tie_target(self.acc, c, False):
                return False
            self.mode, self.buf, self.pitched = "octave", c, True
            return True
        return False

    def _octave(self, c):
        if c in "',":  # (abc2midi: "A'" and "c," are bad pitch specifiers: ' raises a-g, "," lowers A-G)
            if (c == "'") != self.buf[0].islower():
                return False
            if not self._tie_target(self.acc, self.buf + c, False):
                return False
            self.buf += c
            return True
        if not self._tie_target(self.acc, self.buf, True):
            return False
        self.pitch = (self.acc, self.buf)
        if self.in_chord:
            self.chord_pitches = self.chord_pitches | {self.pitch}
        self.mode, self.ltarget, self.lbase = "len", "chordnote" if self.in_chord else "note", Fraction(1)
        self.lnum, self.lsl, self.lden = "", 0, ""
        return None

    def _len(self, c):
        if c in _DIGITS or c == "/":
            if c == "/":
                if self.lden or self.lsl >= 3 or (self.lnum and int(self.lnum) > _MAX_SLASHED):
                    return False
                self.lsl += 1
            elif self.lsl == 0:
                if not any(x.startswith(self.lnum + c) for x in _NUMERATORS):
                    return False
                self.lnum += c
            else:
                if self.lsl > 1 or not any(d.startswith(self.lden + c) for d in _DENOMINATORS):
                    return False  # denominators are powers of two (A/3 is no ABC length abc2midi plays)
                self.lden += c
            if not self._spell_ok(False):
                return False
            if self.ltarget in ("note", "chord"):  # the note must still be able to fit the bar
                return self._room(self._min_length() * self.lbase)
            return True
        if (self.lden and self.lden not in _DENOMINATORS) or not self._spell_ok(True):
            return False
        n = int(self.lnum) if self.lnum else 1
        d = int(self.lden) if self.lden else (2 ** self.lsl if self.lsl else 1)
        if self.lden and self.lsl > 1:
            d *= 2 ** (self.lsl - 1)
        length = Fraction(n, d) * self.lbase
        t = self.ltarget
        if t == "chordnote":
            if self.chord_first is None:
                self.chord_first = length
            self.chord_n += 1
            self.mode = "chord"
            return None
        if t == "grace":
            self.mode = "grace"
            return None
        if not self._commit(self.unit * length, chord=t == "chord"):
            return False
        if t == "chord":
            self.last_pitches, self.tied = self.chord_pitches, self.chord_tied
        else:
            self.last_pitches = frozenset() if self.pitch is None else frozenset((self.pitch,))
        self.mode = "music"
        self.just = True
        return None

    def _spell_ok(self, whole: bool) -> bool:
        """After ">": whether the length typed so far (``whole``: all of it) can still spell the written
        length the pair's second note must have -- checked per char, so no note is begun that cannot end.
        abc2midi compares no chord's length ("[AC]2>[BD]" is fine), so chords are free."""
        if self.bwant is None or self.ltarget != "note":
            return True
        want = self.bwant / (self.unit * self.lbase)
        typed = self.lnum + "/" * self.lsl + self.lden
        sp = _spellings(want)
        return typed in sp if whole else any(x.startswith(typed) for x in sp)

    def _commit(self, d: Fraction, chord: bool = False) -> bool:
        if self.owe_boundary:
            return False
        w = None if chord else d
        self.paired = self.broken_next is not None
        if self.paired:
            if not chord and self.bwant is not None and d != self.bwant:
                return False
            d *= self.broken_next
            self.broken_next = self.bwant = None
        if self.tup_left > 0:
            d *= self.tup_factor
            self.tup_left -= 1
        if self.n == 0:
            self.bar_exp = self.meter
        if self.bar_exp is not None and (self.dur + d + self.tup_left * self.unit * self.tup_factor * _MIN_LENGTH
                                         > self.bar_exp):
            return False
        self.dur += d
        self.n += 1
        self.prev, self.wlen = d, w
        self.tied = frozenset()  # (what a tie waited for was checked as the note or chord was written)
        self.after_bar = False
        self.empties = self.textrun = self.idle = self.blank = 0
        self.nl_note = True
        return True

    def _broken_fits(self) -> bool:
        """Whether the bar still has room for the note a ``>`` / ``<`` (``bk`` of them) pairs with, written
        as long as the first (abc2midi's rule; the shortest note after a chord): decided at the sign, so no
        state is left where no note can follow."""
        if self.bar_exp is None:
            return True
        f = Fraction(1, 2 ** self.bk)
        tf = self.tup_factor if self.tup_left > 0 else 1
        w = self.bwant if self.bwant is not None else self.unit * _MIN_LENGTH
        if self.bdir == ">":
            return self.dur + self.prev * (1 - f) + w * f * tf <= self.bar_exp
        return self.dur - self.prev * (1 - f) + w * (2 - f) * tf <= self.bar_exp

    def _broken(self, c):
        if c == self.bdir and self.bk < 3:
            self.bk += 1
            return self._broken_fits()
        f = Fraction(1, 2 ** self.bk)
        if self.bdir == ">":
            self.dur += self.prev * (1 - f)
            self.broken_next = f
            if self.bar_exp is not None and self.dur > self.bar_exp:
                return False
        else:
            self.dur -= self.prev * (1 - f)
            self.broken_next = 2 - f
        self.prev = None
        self.mode = "music"
        if not self._room():
            return False  # the note it lends time to would have none left
        return None

    def _mrest(self, c):
        if c in _DIGITS and len(self.buf) < 3 and not (c == "0" and not self.buf):
            self.buf += c
            return True
        self.mode = "music"
        return None

    def _lbrack(self, c):
        if self.buf == "d" and not (c in _NOTE_LETTERS or c in "^_="):
            return False  # (after a decoration: a chord)
        if c == "|":
            return self._bar_open("[|")
        if self.owe_boundary:
            return False
        if c in _DIGITS:  # ("g[1&" -- an ending inside a bar, then "&" -- is an abc2midi error: at a bar's start)
            if c == "0" or self.n > 0 or not self._start_ending(c):
                return False
            self.mode, self.buf = "ending", c
            return True
        if c in _INLINE_FIELDS:
            if (c == "V" and self.tied) or not self._idle():
                return False
            self.mode, self.buf = "ifield", c
            return True
        if c in _NOTE_LETTERS or c in "^_=.":
            if not self._room():
                return False
            self.mode, self.in_chord, self.chord_first, self.chord_n = "chord", True, None, 0
            self.chord_pitches = self.chord_tied = frozenset()
            return None
        return False

    def _ifield(self, c):
        if c != ":":
            return False
        self.mode, self.fletter, self.fval, self.fctx = "value", self.buf, "", "i"
        return True

    def _chord(self, c):
        if c in _NOTE_LETTERS or c in "^_=":
            if self.chord_n >= 8:
                return False
            self.mode, self.acc = "note", ""
            return None
        if c == "-":  # a tie of the note before it ("[A-C]")
            if self.chord_n == 0 or self.pitch is None:
                return False
            self.chord_tied = self.chord_tied | {self.pitch}
            return True
        if c == " ":
            return True
        if c == ".":  # a staccato right before a chord note ("[f.]", "[. f]", "[~f]" are abc2midi errors)
            if self.chord_n >= 8:
                return False
            self.mode = "cdot"
            return True
        if c == "]":
            if self.chord_n == 0:
                return False
            if any(not any(sp == tl and a in ("", ta) for a, sp in self.chord_pitches) for ta, tl in self.tied):
                return False  # the chord after a tie holds every tied pitch ("[AC]-[CA]"; "[AC]-[AE]" is an error)
            self.in_chord = False
            self.mode, self.ltarget, self.lbase = "len", "chord", self.chord_first
            self.lnum, self.lsl, self.lden = "", 0, ""
            return True
        return False

    def _cdot(self, c):
        if c in _NOTE_LETTERS or c in "^_=":
            self.mode = "chord"
            return None
        return False

    def _grace(self, c):
        if c == "}":
            self.mode = "music"
            return self.plen > 0 and _GRACE.fullmatch(self.buf) is not None  # ("{}" graces nothing)
        if c in _NOTE_LETTERS:
            self.plen += 1
        elif c in "^_=[" and self.plen >= 16:
            return False  # (it would wait for a 17th note)
        self.buf += c
        return self.plen <= 16 and _GRACE.fullmatch(self.buf, partial=True) is not None

    def _quote(self, c):
        """A chord symbol (``"Am7/G"``: a chord name abc2midi knows) or an annotation (``"^Fine"``: it
        starts with ^ _ < > @); abc2midi errs on any other first char ("N.C.", "Fine", " G")."""
        chord = self.plen > 0 and self.buf[:1] in _NOTE_LETTERS
        if c == '"':
            if chord and not _gchord_ok(self.buf, True):
                return False
            self.gch = self.gch or chord
            self.mode = "music"
            return True
        if c == "%":
            return False  # (abc2midi reads a comment there and the quote never closes)
        if self.plen == 0:
            if c not in _QUOTE_FIRST:
                return False
            self.buf = c
        elif chord:
            self.buf += c
            if not _gchord_ok(self.buf, False):
                return False
        self.plen += 1
        return (" " <= c <= "~" or c >= "\x80") and (self.plen <= 64 or "\x80" <= c <= "\xbf")

    def _deco(self, c):
        if c == "!":
            self.mode = "music"
            return True
        if c == "\n" and self.plen == 0:  # "!" at a line end: ABC 2.0's score line break
            self.mode = "music"
            return None
        self.plen += 1
        return c in _DECO_CHARS and self.plen <= 32

    def _pdeco(self, c):
        if c == "+":
            self.mode = "music"
            return True
        self.plen += 1
        return c in _DECO_CHARS and self.plen <= 32

    def _paren(self, c):
        if c == ")":
            return False  # "()": a slur over nothing (no music21 tune writes one; a small model writes them in runs)
        if c in _DIGITS and c != "0" and c != "1" and self.broken_next is None and self.tup_left == 0 and self._room():
            self.mode, self.tbuf = "tuplet", c
            return True
        self.slur += 1
        self.mode = "music"
        return None

    def _tuplet(self, c):
        part = self.tbuf.rsplit(":", 1)[-1]
        if c in _DIGITS:  # (p:q:r): p, q and r one digit each, 2-9 / 1-9 / 1-9 (p is read in _paren)
            if ":" not in self.tbuf or part or c == "0":
                return False
            self.tbuf += c
            return True
        if c == ":" and self.tbuf.count(":") < 2:
            self.tbuf += c
            return True
        parts = self.tbuf.split(":")
        p = int(parts[0])
        q = int(parts[1]) if len(parts) > 1 and parts[1] else tuplet_q(p, self.meter_str)
        r = int(parts[2]) if len(parts) > 2 and parts[2] else p
        if p < 2 or p > 9 or q < 1 or r < 1:
            return False
        self.tup_left, self.tup_factor = r, Fraction(q, p)
        self.mode = "music"
        if not self._room():
            return False
        return None

    # barlines ---------------------------------------------------------------------------------
    def _line_end_bar(self) -> bool:
        """A line end right after a bar that is exactly full stands for its barline (EsAC transcriptions
        write one bar per line, with no ``|``: 22 of music21's abc2midi-clean tunes): the bar closes as
        if a plain barline were written, and the line end is then a plain one (``b_start``).
        benchmarks.abc_metrics.check_bars reads line ends the same way. A line ending mid-bar carries the
        bar on, as before; free meter and an open tuplet or broken rhythm never close a bar here."""
        if (self.n == 0 or self.multi or self.bar_exp is None or self.tup_left or self.broken_next is not None
                or self.owe_boundary or max(self.dur, self.layers) != self.bar_exp):
            return False
        if not self._bar_open("|"):
            return False
        self._bar_kind_done("plain")
        self.lastbar = "|"
        return True

    def _bar_open(self, first: str) -> bool:
        """A barline starts: the bar before it closes (its kind is known once the barline ends)."""
        if self.broken_next is not None or self.tup_left > 0:
            return False
        total = max(self.dur, self.layers)
        self.need_boundary = False
        if self.n > 0 or self.multi:
            if self.multi or self.bar_exp is None:  # (a free meter's bar: abc2midi accompanies it as 4/4)
                self.last_full = self.multi or not (self.gch and _gchord_sounding(self.meter_str, total))
            else:
                full = total == self.bar_exp
                self.shorts = 0 if full else self.shorts + 1
                if self.shorts > _MAX_SHORT_BARS:
                    return False
                if not full:
                    if self.nbars == 0 and self.pickup is None:
                        self.pickup = total
                    self.need_boundary = self.left not in ("start", "repeat", "section")
                # (a bar completing the pickup may end the tune, unless an accompaniment note is
                # still sounding where it stops: "Sustained notes beyond end of track")
                self.last_full = full or (self.nbars > 0 and self.pickup is not None
                                          and total + self.pickup == self.bar_exp
                                          and not (self.gch and _gchord_sounding(self.meter_str, total)))
            self.nbars += 1
            self.closed = True
        else:
            self.closed = False
            if self.phase == "body":
                self.empties += 1
                if self.empties > self.empty_cap() and not self.owe_boundary:
                    return False  # (the section barline a short bar is owed is always allowed)
        self.dur, self.n, self.layers, self.bar_exp, self.multi = Fraction(0), 0, Fraction(0), None, False
        self.prev, self.just = None, False
        self.mode, self.buf = "bar", first
        self.after_bar = True
        return True

    def empty_cap(self) -> int:
        """Empty bars allowed in a row: EsAC incipits open with up to 4 (" |  |  |  | D3E |"); once a bar of
        music was written, one (a line ending and the next one starting with a barline)."""
        return _MAX_EMPTY_BARS if self.nbars == 0 else _MAX_EMPTY_BARS_LATER

    def _bar(self, c):
        b = self.buf
        if c == "|" and not b.endswith("]") and len(b) < 5:
            self.buf += c
            return True
        if c == ":" and not b.endswith("]") and len(b) < 5:
            if self.rep_open and ":" not in b:
                return False  # a second "|:" before the first is closed (abc2midi: "found another |:")
            if "::" in b and "|" in b:
                return False  # "::|:" opens the repeat twice (abc2midi reads "::" then "|:")
            if b == ":" and self.colon_closed:
                return False  # (see colon_closed)
            self.buf += c
            return True
        if c == "]" and b in ("|", ":|"):  # ("||]" is an abc2midi error)
            self.buf += c
            return True
        if "|" not in b and b.count(":") < 2:
            # a lone ':' is no barline; abc2midi ignores one right after a barline, across a line end
            # (":|\n: B" and "||\\\n:e" in music21, meant as ":|:" and "||:"): it opens and closes nothing
            if b == ":" and not self.closed and self.lastbar.endswith(("|", "]")):
                self.mode = "music"
                return None
            return False
        kind = "repeat" if ":" in b else "section" if (b in ("||", "|]", "[|") or b.endswith("]")
                                                       or b.count("|") > 1) else "plain"
        if kind == "plain" and self.empties > self.empty_cap():
            return False  # past the cap only the section barline a short bar is owed (_bar_open) may end here
        self._bar_kind_done(kind)
        if b.startswith(":"):  # a ":|" closes the open repeat, and a first ending
            self.rep_open = False
            self.rep_closed = self.var == 0 or self.rep_closed
            self.var = 2 if self.var == 1 else self.var
        if "::" in b or ":" in b.partition("|")[2]:
            self.rep_open = True  # ("|:|" and "::|" open a repeat for abc2midi too)
        if self.rep_open or kind == "section":
            self.rep_closed = False
        if b.startswith(":|"):
            self.colon_closed = True
        elif "|:" in b and not b.startswith(":"):
            self.colon_closed = False
        self.lastbar = b
        if c in _DIGITS and c != "0":
            if b not in ("|", ":|") or not self._start_ending(c):
                return False
            self.mode, self.buf = "ending", c
            return True
        if self.var == 3 and kind != "plain":
            self.var = 0
        self.mode = "music"
        return None

    def _start_ending(self, c: str) -> bool:
        """A numbered ending ``c`` starts (see ``var``): a set begins with 1, and not straight after a ":|"
        closed a repeat (abc2midi: "found [1 or like before |:" until a "|:" or "||"); a later one right
        after a ":|" (abc2midi: "Need || |: :| or :: to mark end of variant ending")."""
        if self.var == 0:
            if c != "1" or self.rep_closed:
                return False
            self.var = 1
            return True
        if self.var in (2, 3) and ":" in self.lastbar:
            self.var = 3
            return True
        return False

    def _bar_kind_done(self, kind: str):
        if self.closed:
            self.left = kind
            if self.need_boundary and kind == "plain":
                self.owe_boundary = True
        elif kind != "plain":
            if self.left in ("start", "plain"):
                self.left = kind
            self.owe_boundary = False
        self.need_boundary = False

    def _ending(self, c):
        if c in _DIGITS or (c in ",-" and self.buf[-1:] in _DIGITS):
            if len(self.buf) >= 8:
                return False
            self.buf += c
            return True
        if self.buf[-1:] not in _DIGITS:
            return False
        self.mode = "music"
        self.after_bar = False
        return None

    def _voice_change(self) -> bool:
        """``V:`` switches voice: an unfinished bar of the last voice is left as it is; the new voice
        starts like a tune (its first bar may be a pickup)."""
        if self.broken_next is not None or self.tup_left > 0 or self.tied:
            return False
        self.dur, self.n, self.layers, self.bar_exp, self.multi = Fraction(0), 0, Fraction(0), None, False
        self.left, self.owe_boundary, self.prev, self.just = "start", False, None, False
        return True


# the request is in the key as spec_key (the dict itself is unhashable): rows of one batch ask for different fields
# and share the caches; a key without it gave a row the transitions of another row's request (2026-12-02)
_KEY_SLOTS = tuple(s for s in AbcState.__slots__ if s not in ("spec", "_key"))
_STEP = {"pre": AbcState._pre, "h_start": AbcState._h_start, "h_letter": AbcState._h_letter,
         "value": AbcState._value, "comment": AbcState._comment, "b_start": AbcState._b_start,
         "b_letter": AbcState._b_letter, "b_colon": AbcState._b_colon, "end": AbcState._end,
         "music": AbcState._music, "note": AbcState._note, "octave": AbcState._octave, "len": AbcState._len,
         "broken": AbcState._broken, "mrest": AbcState._mrest, "lbrack": AbcState._lbrack,
         "cdot": AbcState._cdot,
         "ifield": AbcState._ifield, "chord": AbcState._chord, "grace": AbcState._grace,
         "quote": AbcState._quote, "deco": AbcState._deco, "pdeco": AbcState._pdeco, "paren": AbcState._paren,
         "tuplet": AbcState._tuplet, "bar": AbcState._bar, "ending": AbcState._ending,
         "eol": AbcState._eol}


def _requested_prefix_ok(v: str, want: str) -> bool:
    """A requested header value: up to 3 spaces (real tunes write "T:  Title"), then exactly ``want``,
    then only spaces or a comment."""
    s = v.lstrip(" ")
    if len(v) - len(s) > 3:
        return False
    if len(s) <= len(want):
        return want.startswith(s)
    return s.startswith(want) and re.fullmatch(r" *(%.*)?", s[len(want):]) is not None


def to_machine_text(text: str) -> str:
    """The state machine's alphabet: one latin-1 char per UTF-8 byte of ``text``."""
    return text.encode("utf-8").decode("latin-1")


def check_text(text: str, fields: dict | None = None, start: AbcState | None = None) -> tuple[AbcState | None, int]:
    """Feeds ``text`` (a tune) to a fresh state (or ``start``): (final state, -1) when every prefix is
    allowed, else (None, index of the first refused character of the machine text)."""
    st = start.clone() if start is not None else AbcState(validate_fields(fields or {}))
    for i, c in enumerate(to_machine_text(text)):
        if not st.feed(c):
            return None, i
    return st, -1


def initial_state(prompt: str, fields: dict) -> tuple[AbcState, str]:
    """Where the constraint starts for a prompt, and the prompt text it continues: when the prompt ends
    inside an ABC tune (a raw header to continue), the state after that tune text; otherwise a fresh
    state and "" (the reply must be a tune from ``X:`` on)."""
    spec = validate_fields(fields)
    starts = [m.start() for m in re.finditer(r"(?m)^X:", prompt)]
    if starts:
        st, _ = check_text(prompt[starts[-1]:], start=AbcState(spec))
        if st is not None:
            return st, prompt[starts[-1]:]
    return AbcState(spec), ""


# ------------------------------------------------------------------------------ token texts


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-char table (byte-level BPE vocabularies are written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_texts(tokenizer) -> list[str | None]:
    """Every token's text in the machine alphabet (latin-1 chars of its UTF-8 bytes), None for special
    tokens. Byte-level BPE pieces map through GPT-2's byte table; SentencePiece ``<0xNN>`` pieces are
    their byte; other pieces are decoded after an anchor token, so a leading space is kept."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    for t in getattr(tokenizer, "added_tokens_decoder", {}) or {}:
        if getattr(tokenizer.added_tokens_decoder[t], "special", False):
            special.add(int(t))
    byte_level = False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))
        except (ValueError, TypeError, AttributeError):
            byte_level = False
    out: list[str | None] = [None] * n
    if byte_level:
        inv = {v: k for k, v in _bytes_to_unicode().items()}
        for i, p in enumerate(pieces):
            if i in special or p is None:
                continue
            try:
                out[i] = bytes(inv[ch] for ch in p).decode("latin-1")
            except KeyError:  # an added (non-byte-level) token: its plain text
                out[i] = to_machine_text(p)
        return out
    anchor_ids = tokenizer.encode("X", add_special_tokens=False)
    anchor = anchor_ids[-1] if anchor_ids else next(i for i in range(n) if i not in special)
    base = tokenizer.decode([anchor])
    ids = [i for i in range(n) if i not in special and pieces[i] is not None and not _BYTE_PIECE.match(pieces[i])]
    decoded = tokenizer.batch_decode([[anchor, i] for i in ids])
    for i, d in zip(ids, decoded):
        if d.startswith(base) and "\ufffd" not in d:
            out[i] = to_machine_text(d[len(base):])
    for i, p in enumerate(pieces):
        if i not in special and p is not None:
            m = _BYTE_PIECE.match(p)
            if m:
                out[i] = chr(int(m.group(1), 16))
    return out


class _Vocab:
    """Token texts of one tokenizer, a byte trie over them, and the spelling check (cached per tokenizer)."""

    def __init__(self, tokenizer):
        self.texts = token_texts(tokenizer)
        self.trie: dict = {}
        for i, t in enumerate(self.texts):
            if not t:
                continue
            node = self.trie
            for ch in t:
                node = node.setdefault(ch, {})
            node.setdefault(None, []).append(i)
        self.singles = {t for t in self.texts if t and len(t) == 1}
        # tokens that only write notes, rests, lengths and barlines: what a tune is finished with
        self.closing = {i for i, t in enumerate(self.texts) if t and set(t) <= _CLOSING_CHARS}

    def prefixes(self, text: str) -> list[int]:
        """The ids of every token whose text is a prefix of ``text`` (a walk down the trie along it)."""
        out, node = [], self.trie
        for ch in text:
            node = node.get(ch)
            if node is None:
                break
            out.extend(node.get(None, ()))
        return out

    def check_spelling(self, spec: dict, name: str):
        need = set("X:K|\n0123456789/ABCDEFGabcdefg ") | {c for v in spec.values() for c in to_machine_text(v)}
        missing = sorted(need - self.singles)
        if missing:
            shown = ", ".join(repr(c.encode("latin-1").decode("utf-8", "replace")) for c in missing[:8])
            raise ConstraintError(f"tokenizer {name}: no token spells {shown} on its own, so the ABC "
                                  "constraint could be left with nothing to write; use a tokenizer with byte "
                                  "fallback or single-character pieces")


_VOCABS: dict[int, _Vocab] = {}


def vocab_for(tokenizer) -> _Vocab:
    key = id(tokenizer)
    if key not in _VOCABS:
        _VOCABS[key] = _Vocab(tokenizer)
    return _VOCABS[key]


# ------------------------------------------------------------------------------- the processor


_NOTE_START = re.compile(r"[_^=]*[A-Ga-gzZx]")
_QUOTED = re.compile(r'"[^"\n]*"?|![^!\n]*!?|\+[^+\n]*\+?')


def repeated_bar(text: str) -> tuple[str, str] | None:
    """Where the last ``_MAX_SAME_BARS`` complete bars of ``text`` (within its last 400 chars: 62 µs a call)
    are one and the same bar: (the current bar so far, the opening of that bar up to its second note), else
    None. A musical cap, not a rule of ABC, so the processor applies it to its candidates only (never to its fallback: it can never leave a row with nothing
    allowed): the bar after them must open differently ("G2G2G2" twenty times over is what a small model
    writes when nothing stops it; music21's tunes repeat a bar at most 5 times in a row)."""
    tail = _QUOTED.sub(lambda m: "_" * len(m.group(0)), text[-400:])  # (quotes may hold "|"; lengths kept)
    cuts = [m.span() for m in BARLINE.finditer(tail)]
    head = [m.end() for m in re.finditer(r"(?m)^K:[^\n]*\n", tail)]  # (the first bar starts after K:)
    if head and (not cuts or head[-1] <= cuts[0][0]):
        cuts.insert(0, (head[-1], head[-1]))
    if len(cuts) < _MAX_SAME_BARS + 1:
        return None
    bars = [text[len(text) - len(tail) + a[1]:len(text) - len(tail) + b[0]]
            for a, b in zip(cuts[-_MAX_SAME_BARS - 1:-1], cuts[-_MAX_SAME_BARS:])]
    same = {re.sub(r"\s+", "", b) for b in bars}
    if len(same) != 1 or "" in same:
        return None
    bar = same.pop()
    notes = list(_NOTE_START.finditer(_QUOTED.sub(lambda m: "_" * len(m.group(0)), bar)))
    opening = bar[:notes[1].start()] if len(notes) > 1 else bar
    return text[len(text) - len(tail) + cuts[-1][1]:], opening


def opens_with(current: str, piece: str, opening: str) -> bool:
    """Whether ``piece`` makes the bar being written (``current``) open with ``opening``."""
    t = current + piece
    m = BARLINE.search(_QUOTED.sub(lambda m: "_" * len(m.group(0)), t))
    return re.sub(r"\s+", "", t[:m.start()] if m else t).startswith(opening)


def steered_ending(st: AbcState, final: str = "|]") -> str | None:
    """The text a steered row ends with (``final``: the closing barline where no repeat waits):
    :meth:`AbcState.finish_text` where nothing is open, else the shortest run of closing chars (a
    breadth-first search of at most 6 chars over the state machine: the quote's '"', a length's digit, a line
    end ...) that reaches such a point, then its finish."""
    f = st.finish_text(final)
    if f is not None or st.phase != "body":
        return f
    alphabet = ['"', "!", "+", "}", "]", " ", "\n", ")", st.tonic, "2", "1", "4", "8", "/", "|", ":"]
    alphabet += sorted({tl[0] for _, tl in st.tied} - {st.tonic}) + ["'", ","] * bool(st.tied)  # (a tied chord)
    frontier, seen = [(st, "")], {st.key()}
    for _ in range(6):
        nxt = []
        for s0, path in frontier:
            for ch in alphabet:
                s2 = s0.after(ch)
                if s2 is None or s2.key() in seen:
                    continue
                seen.add(s2.key())
                f = s2.finish_text(final)
                if f is not None:
                    return path + ch + f
                nxt.append((s2, path + ch))
        frontier = nxt[:64]
    return None


class ABCConstraintProcessor(LogitsProcessor):
    """Masks tokens that would break the ABC constraint, row by row (see the module doc).

    ``fields``: one request dict per row (or one for all rows); ``prompts``: each row's prompt text (a
    prompt that ends inside an ABC header is continued from there). ``greedy``: stop checking at the
    first allowed candidate. ``top_n``: candidates checked before the vocabulary walk. ``max_new_tokens``:
    the generation's budget; in its last ``_CLOSING_RESERVE`` tokens (at most a quarter of it) a row is
    steered to its end -- only notes, rests and barlines, and EOS alone once a bar is complete -- so a
    tune that would run on past the budget ends as a whole tune instead of being cut mid-bar."""

    def __init__(self, tokenizer, fields: list[dict] | dict | None, prompts: list[str], greedy: bool = False,
                 top_n: int = 64, eos_token_id: int | None = None, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, max_new_tokens: int | None = None):
        self.vocab = vocab_for(tokenizer)
        rows = len(prompts)
        fl = fields if isinstance(fields, list) else [fields or {}] * rows
        if len(fl) != rows:
            raise ValueError(f"{len(fl)} field dicts for {rows} prompts")
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.fields = [validate_fields(f) for f in fl]
        for f in self.fields:
            self.vocab.check_spelling(f, name)
        starts = [initial_state(p, f) for p, f in zip(prompts, self.fields)]
        self.states = [s for s, _ in starts]
        self.prefix = [t for _, t in starts]  # the prompt's own ABC that a reply continues
        self.eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.greedy, self.top_n = greedy, max(1, int(top_n), int(top_k or 0))
        self.temperature = float(temperature) if temperature and temperature > 0 else 1.0
        self.top_k, self.top_p = int(top_k or 0), float(top_p or 1.0)
        self.seconds, self.steps, self.checked, self.scans = 0.0, 0, 0, 0  # cost accounting (report())
        self.start: int | None = None
        self.fed = 0
        self.done = [False] * rows
        self.stop: list[str | None] = [None] * rows
        self.closing_from = (None if not max_new_tokens
                             else int(max_new_tokens) - min(_CLOSING_RESERVE, int(max_new_tokens) // 4))
        # A header still open after half the budget (128 tokens without one) is hurried to its K:
        self.header_from = int(max_new_tokens) // 2 if max_new_tokens else _HEADER_TOKENS
        self.closed_rows = [False] * rows     # rows that were steered to their end (report())
        self.plan: list[str | None] = [None] * rows  # the ending a steered row is writing (finish_text)
        self.texts = [""] * rows              # each row's reply so far (machine text; repeated_bar)
        self.final = "|]" if "]" in self.vocab.singles else "|"
        self._trans: dict[tuple, dict] = {}
        self._scan: dict[tuple, list[int]] = {}

    # transitions ------------------------------------------------------------------------------
    def _next(self, st: AbcState, tid: int) -> AbcState | None:
        row = self._trans.get(st.key())
        if row is None:
            if len(self._trans) > 200_000:
                self._trans.clear()
            row = self._trans[st.key()] = {}
        if tid in row:
            return row[tid]
        text = self.vocab.texts[tid] if tid < len(self.vocab.texts) else None
        ns = st.after(text) if text else None
        row[tid] = ns
        return ns

    def allowed_all(self, st: AbcState) -> list[int]:
        """Every allowed token id (the vocabulary walked as a trie pruned by the machine), EOS included."""
        k = st.key()
        if k in self._scan:
            return self._scan[k]
        out: list[int] = []
        stack = [(self.vocab.trie, st)]
        while stack:
            node, s = stack.pop()
            for ch, child in node.items():
                if ch is None:
                    out.extend(child)
                    continue
                s2 = s.clone()
                if s2.feed(ch):
                    stack.append((child, s2))
        if st.can_end() and self.eos is not None:
            out.append(self.eos)
        if len(self._scan) > 20_000:
            self._scan.clear()
        self._scan[k] = out
        return out

    def _consume(self, input_ids: torch.LongTensor):
        T = input_ids.shape[1]
        if self.start is None:
            self.start = T
            self.fed = self.start
        if T == self.fed:
            return
        new = input_ids[:, self.fed:T].tolist()
        self.fed = T
        for r, toks in enumerate(new):
            for t in toks:
                if self.done[r]:
                    break
                if t == self.eos:
                    self.done[r] = True
                    if self.stop[r] is None:
                        self.stop[r] = "eos"
                    break
                txt = self.vocab.texts[t] if t < len(self.vocab.texts) else None
                self.texts[r] = (self.texts[r] + (txt or ""))[-1000:]
                p = self.plan[r]
                if p is not None:
                    self.plan[r] = p[len(txt):] if txt and p.startswith(txt) else None
                ns = self._next(self.states[r], t)
                if ns is None:  # only reachable when another processor overrode the mask
                    self.done[r] = True
                    self.stop[r] = f"token {t} was generated against the constraint ({self.states[r].describe()})"
                    break
                self.states[r] = ns

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t0 = time.perf_counter()
        out = self._mask(input_ids, scores)
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        return out

    def _mask(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Candidates in logit order; a row stops checking as soon as the tokens the warpers after it can
        keep are decided: greedy at the first allowed token, top-k after k allowed ones, top-p once the
        allowed mass found is at least top_p of every allowed mass still possible (found + unseen, under
        the same temperature), so the sampled distribution is exactly the masked one; at most ``top_n``."""
        self._consume(input_ids)
        B, V = scores.shape
        k = min(self.top_n, V)
        top_v, top_i = torch.topk(scores, k, dim=1)
        if self.greedy or self.top_p >= 1.0:  # no nucleus to decide: the probabilities are not needed
            top_p = [[0.0] * k] * B
        else:
            lse = torch.logsumexp(scores.float() / self.temperature, dim=1, keepdim=True)
            top_p = torch.exp(top_v.float() / self.temperature - lse).tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        neg = float("-inf")
        need_k = 1 if self.greedy else (self.top_k or k)
        rows, cols = [], []
        forced = []
        out = torch.full_like(scores, neg)
        used = input_ids.shape[1] - self.start
        closing = self.closing_from is not None and used >= self.closing_from
        for r in range(B):
            if r >= len(self.states) or self.done[r]:
                out[r] = scores[r]  # finished: transformers pads these rows whatever is sampled
                continue
            st = self.states[r]
            if used >= self.header_from and st.phase in ("pre", "header") and not st.hurry:
                st = st.clone()
                st.hurry = True
                self.states[r] = st
            if closing:
                self.closed_rows[r] = True
                allowed = self._closing(st, scores[r], r)
                if allowed:
                    rows.extend([r] * len(allowed))
                    cols.extend(allowed)
                    continue
            allowed = []
            seen = found = 0.0
            same = repeated_bar(self.texts[r]) if st.phase == "body" else None
            for v, t, p in zip(top_v[r], top_i[r], top_p[r]):
                if v == neg:
                    break
                self.checked += 1
                ok = st.can_end() if t == self.eos else self._next(st, t) is not None
                if ok and same and t != self.eos and opens_with(same[0], self.vocab.texts[t], same[1]):
                    ok = False  # a bar repeated _MAX_SAME_BARS times: the next one opens otherwise
                seen += p
                if ok:
                    allowed.append(t)
                    found += p
                    if len(allowed) >= need_k or (self.top_p < 1.0 and found >= self.top_p * (found + max(0.0, 1.0 - seen))):
                        break
            if not allowed:
                self.scans += 1
                idx = torch.tensor([t for t in self.allowed_all(st) if t < V], dtype=torch.long)
                if len(idx):
                    vals = scores[r, idx.to(scores.device)].cpu()
                    idx = idx[vals != neg]
                    vals = vals[vals != neg]
                    if self.greedy and len(idx):
                        idx = idx[int(torch.argmax(vals))].reshape(1)
                allowed = idx.tolist()
            if not allowed:
                forced.append(r)
                self.stop[r] = f"no token allowed ({st.describe()}): ended with EOS"
                self.done[r] = True
                continue
            rows.extend([r] * len(allowed))
            cols.extend(allowed)
        if rows:
            ri = torch.tensor(rows, device=scores.device)
            ci = torch.tensor(cols, device=scores.device)
            out[ri, ci] = scores[ri, ci]
        for r in forced:
            if self.eos is not None:
                out[r, self.eos] = 0.0
        return out

    def _closing(self, st: AbcState, row_scores: torch.FloatTensor, r: int) -> list[int]:
        """The allowed tokens of a row being steered to its end: EOS once it may end; where nothing is open,
        the tokens that spell the start of :meth:`AbcState.finish_text` (the bar filled with the tonic, then
        ":|" or "|]": a few tokens at most); else the first non-empty tier of: a token that closes what is
        open (a quote, !decoration!, grace group, chord, field line, comment); a barline once the bar is
        full (first one after which the tune may end); ')' while a slur is open; notes and rests in whole
        units of L:, then fractions -- never a whitespace-only token, a stray ")" or a barline that closes a short bar.
        The best one when greedy; [] = nothing fits (the caller falls back to every allowed token)."""
        if st.can_end() and self.eos is not None:
            return [self.eos]
        V = row_scores.shape[0]
        if not self.plan[r]:
            self.plan[r] = steered_ending(st, self.final)
        plan = self.plan[r]
        if plan:
            ids = [t for t in self.vocab.prefixes(plan) if t < V and self._next(st, t) is not None]
            if ids:
                vals = row_scores[torch.tensor(ids, device=row_scores.device)].tolist()
                keep = [(v, t) for t, v in zip(ids, vals) if v != float("-inf")]
                if keep:
                    return [max(keep)[1]] if self.greedy else [t for _, t in keep]
            self.plan[r] = None
        closer = "]" if (st.mode == "value" and st.fctx == "i") else _CLOSERS.get(st.mode)
        full = st.n > 0 and st.bar_exp is not None and st.dur >= st.bar_exp
        tiers: list[list[int]] = [[], [], [], [], [], []]
        for t in self.allowed_all(st):
            if t >= V:
                continue
            text = self.vocab.texts[t]
            if closer is not None:
                if closer in text:
                    tiers[0].append(t)
                continue
            if t not in self.vocab.closing or not text.strip() or (st.slur == 0 and not text.replace(")", "").strip()):
                continue  # (a stray ")" closes nothing: a steered row once spent its budget on 47 of them)
            ns = self._next(st, t)
            if ns is None or ns.owe_boundary or (ns.nbars > st.nbars and not ns.last_full):
                continue
            if full:
                if ns.nbars > st.nbars:  # a barline: first one after which the tune may end (":|" of a repeat)
                    tiers[1 if ns.can_end() else 2].append(t)
            elif st.slur > 0 and ")" in text:
                tiers[3].append(t)
            else:
                tiers[5 if "/" in text else 4].append(t)
        for ids in tiers:
            if not ids:
                continue
            vals = row_scores[torch.tensor(ids, device=row_scores.device)].tolist()
            keep = [(v, t) for t, v in zip(ids, vals) if v != float("-inf")]
            if keep:
                return [max(keep)[1]] if self.greedy else [t for _, t in keep]
        return []

    # results ----------------------------------------------------------------------------------
    def report(self, row: int, text: str | None = None, ended_at_eos: bool = False) -> dict:
        """What row ``row`` asked for and whether the reply met it: ``{"fields", "satisfied", "stop"}``
        (stop: eos | max_new_tokens | the reason the constraint had to end it). ``ended_at_eos``: the
        caller saw EOS as the row's last token (generation ends before the processor sees it)."""
        if self.stop[row] is None and ended_at_eos:
            self.stop[row] = "eos"
        stop = self.stop[row] or "max_new_tokens"
        rec = {"fields": dict(self.fields[row]), "satisfied": stop == "eos", "stop": stop,
               "steered_to_end": self.closed_rows[row],
               "ms_per_step": round(1000 * self.seconds / max(self.steps, 1), 3)}
        if text is not None and stop == "eos":
            text = self.prefix[row] + text
            header, _ = split_header_body(text[text.find("X:"):] if "X:" in text else text)
            rec["satisfied"] = all(header.get(k) == v for k, v in self.fields[row].items() if k != "mode")
        return rec


def constraint_processor(tokenizer, prompts: list[str], fields: list[dict] | dict | None = None,
                         greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, eos_token_id: int | None = None,
                         max_new_tokens: int | None = None) -> ABCConstraintProcessor:
    """The processor for a generation call (the sampling settings decide how many candidates matter):
    ``fields`` None = extracted from each prompt; ``eos_token_id``: the token that ends a reply (default EOS);
    ``max_new_tokens``: the call's budget (the tune is steered to its end before it runs out)."""
    if fields is None:
        fields = [extract_fields(p) for p in prompts]
    return ABCConstraintProcessor(tokenizer, fields, prompts, greedy=greedy, temperature=temperature,
                                  top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                  max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------------- a tune's own request


def own_fields(tune: str) -> dict:
    """The constrained fields of a tune's own header (what a request for exactly this tune would say)."""
    header, _ = split_header_body(tune)
    return {k: header[k] for k in CONSTRAINED_FIELDS if header.get(k)}

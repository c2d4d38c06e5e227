"""inference/abc_constraint.py: the ABC state machine (real tunes stay allowed, every listed construct,
what is refused), prompt fields (incl. every SFT template round trip), token texts of real tokenizers,
and constrained generation with a tiny model whose output the bar checker of benchmarks/abc_metrics
(the one checker, not a second copy) finds consistent."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.abc_metrics import check_bars
from benchmarks.constraint_property import corpus_property
from data_preprocess.abc_meter import split_header_body
from data_preprocess.abctools import abc_to_midi
from data_preprocess.hub import ArgumentError
from inference.abc_constraint import (
    ABCConstraintProcessor,
    AbcState,
    ConstraintError,
    check_text,
    extract_fields,
    own_fields,
    steered_ending,
    to_machine_text,
    token_texts,
    validate_fields,
)

REPO = Path(__file__).resolve().parents[1]


def _accepts(tune: str, fields: dict | None = None) -> AbcState | None:
    st, _ = check_text(tune, own_fields(tune) if fields is None else fields)
    return st


def _refused_at(tune: str, fields: dict | None = None) -> str:
    """The text up to and including the first refused character ('' when all is allowed)."""
    st, i = check_text(tune, own_fields(tune) if fields is None else fields)
    return "" if st is not None else to_machine_text(tune)[:i + 1]


# ------------------------------------------------------------------- every construct real tunes use

H = "X:1\nT:Fixture\nM:{m}\nL:{l}\nK:{k}\n"
CONSTRUCTS = {
    "pickup and last bar completing it": H.format(m="6/8", l="1/8", k="G") + "D|GAG GAB|ABA AB2|\n",
    "tuplets": H.format(m="4/4", l="1/8", k="D") + "(3ABc d2 (3:2:3efg a2|(3d2e2f2 g4|]\n",
    "broken rhythm": H.format(m="4/4", l="1/8", k="D") + "A>B c<d e>>f g2|A2>B2 c4|]\n",
    "chords": H.format(m="4/4", l="1/8", k="C") + "[ceg]2 [c2e2g2] [CEG]4|[ce]/[df]/ g3 z4|]\n",
    "grace notes": H.format(m="3/4", l="1/8", k="D") + "{g}A2 {ag}B2 {/c}d2|{AB}c6|]\n",
    "ties and slurs": H.format(m="3/4", l="1/4", k="F") + "(A B c-|c) d2|]\n",
    "rests z and x": H.format(m="4/4", l="1/8", k="C") + "z2 A2 x2 B2|z8|Z2|]\n",
    "repeats": H.format(m="2/4", l="1/8", k="A") + "|:A2 B2|c4:|:d2 e2|f4:|:g2 a2|b4:|\n",
    "first and second endings": H.format(m="4/4", l="1/8", k="G") + "|:G8|[1 A8:|[2 B8|]\n"
                                + "|:c8|1 d8:|2 e8|]\n",
    "inline meter, length and key": H.format(m="4/4", l="1/8", k="D") + "A8|[M:3/4] A6|[L:1/16] A12|[K:G] G12|]\n",
    "body field lines": H.format(m="4/4", l="1/8", k="D") + "A8|\nM:3/4\nL:1/4\nK:Em\nE3|\nw: la la\n",
    "common time": H.format(m="C", l="1/8", k="D") + "A8|B8|]\n",
    "cut time": H.format(m="C|", l="1/4", k="D") + "A4|B2c2|]\n",
    "free meter": H.format(m="none", l="1/8", k="D") + "ABCDEFG|abc|defgabc'|]\n",
    "decorations and chord symbols": H.format(m="4/4", l="1/8", k="Ador") + '"Am"~A2 .B2 !trill!c2 ~d2|"^Fine"e8|]\n',
    "default unit length": "X:1\nT:No L\nM:2/4\nK:D\nA4 B4|c8|]\n",
    "pickup into a section": H.format(m="4/4", l="1/8", k="D") + "A8|B6||c2|d8|]\n",
    # EsAC: a line end after an exactly full bar stands for its barline; a line ending mid-bar carries it on
    "a line per bar, no barlines": H.format(m="3/4", l="1/16", k="G") + "G2A2B2c2d4\nB4\nA2G2A4\ng12\n",
    "broken rhythm across a line end": H.format(m="C|", l="1/8", k="G") + "D>F|G>AB>c d>Be>c|d2 B>c d2 F\n>G|]\n",
    "a lone colon after a barline (abc2midi ignores it)": H.format(m="2/4", l="1/8", k="D")
                                                          + "|: AB cd | ef ga :|\n: ba gf | ed cB :|\n",
    "a key with its accidentals": H.format(m="6/8", l="1/8", k="D") + "dcd dcd|d6:|\nK:Dmix=c\n|:c6|cBA d3:|\n",
}


@pytest.mark.parametrize("name", list(CONSTRUCTS))
def test_every_construct_is_allowed_and_may_end(name):
    tune = CONSTRUCTS[name]
    assert _refused_at(tune) == "", name
    st = _accepts(tune)
    assert st.can_end(), f"{name}: {st.describe()}"
    # the fixtures are real music: the one bar checker agrees, abc2midi converts them without a bar warning
    bc = check_bars(tune)
    assert bc.n_match == bc.n_bars, (name, bc.mismatches)
    r = abc_to_midi(tune)
    assert r.ok and not [w for w in r.warnings if "time units" in w], (name, r.warnings, r.errors)


# ------------------------------------------------------------------------------ what is refused


def test_wrong_bars_keys_and_ends_are_refused():
    head = H.format(m="4/4", l="1/8", k="D")
    # a bar too long: the note that overflows
    assert _refused_at(head + "A8|A6 B2 c").endswith("c")
    # a line end is a barline only after an exactly full bar: an overfull line is refused at its overflow
    assert _refused_at(head + "A8\nB8\nc8\n") == "" and _accepts(head + "A8\nB8\n").can_end()
    assert _refused_at(head + "A6\nB2 c").endswith("c")
    assert _refused_at(head + "A4B4c").endswith("c")
    assert not _accepts(head + "A8\nB4\n").can_end()
    assert _refused_at(head + "A4\n-A4|").endswith("-")      # a tie does not start a line (abc2midi: an error)
    assert _refused_at(head + "A8|B8 :\n").endswith("\n")    # a lone ":" is no barline ...
    assert _refused_at(head + "A8|\n:B8|") == ""             # ... but after one abc2midi ignores it
    # a run of letters the extractor reads as prose (2+ decorations among 3+ letters) is never written
    assert _refused_at(head + "A8|TCH").endswith("TCH") and _refused_at(head + "A8|eBTH").endswith("TH")
    assert _refused_at(head + "A8|uvA2 vuB2 TA4|") == ""            # (bowings u/v are music to both)
    from inference.abc_extract import extract_abc

    assert extract_abc("Here it is:\n" + head + "A8|uvA2 vuB2 TA4|\n")
    # a value of blanks alone is capped (music21: 7 at most before a value)
    assert _refused_at("X:1\nK:" + " " * 9, {}).endswith(" " * 9) and _refused_at("X:1\nK:       G\n", {}) == ""
    # an L: change mid-bar must leave the rest of the bar writable in the new unit (else no ending exists)
    assert _refused_at(head + "A7 B/16\nL:1/4\n").endswith("1/4\n")
    assert _refused_at(head + "A4\nL:1/4\nc2|") == ""
    # a short bar in the middle closed by a plain barline: the next note is refused
    assert _refused_at(head + "A8|A6|B").endswith("B")
    # ... but not when it closes a section (a repeat or ||)
    assert _refused_at(head + "A8|A6:|B8|") == ""
    # the requested key / meter / title must be the header's
    assert _refused_at("X:1\nT:x\nM:4/4\nL:1/8\nK:G\n", {"K": "D"}).endswith("G")
    assert _refused_at("X:1\nM:3/4\n", {"M": "6/8"}).endswith("3")
    assert _refused_at("X:1\nK:D\n", {"T": "The Kesh", "K": "D"}).endswith("K")  # K: only after the asked fields
    assert _refused_at("T:x\n", {}).endswith(":")  # X: first
    assert _refused_at("Here it is:\nT:x\n", {}).endswith("T")  # one line of text may come before X:
    assert _refused_at("Here it is:\nX:1\nK:D\n", {}) == ""
    assert _refused_at("X:1\nK:Q\n", {}).endswith("Q")  # an unknown key cannot even start
    assert _refused_at("X:1\nK:Em\n", {"mode": "maj"}).endswith("\n")  # mode asked: E minor cannot end the line
    # EOS: only after a barline that closed a complete bar, nothing open
    st = _accepts(head + "A8|")
    assert st.can_end()
    for tail in ("A4", "A8", "A8|A4|", "A8|[A", 'A8|"Am', "A8|(A8|", "A8|(3AB", "A8|!tri"):
        s2 = _accepts(head + tail)
        assert s2 is not None and not s2.can_end(), tail
    # abc2midi: meter denominators are powers of two; "X" rests read as new tunes to extractors; ":" is no barline
    assert _refused_at("X:1\nM:14/22", {}).endswith("/22")
    assert _refused_at("X:1\nM:00", {}).endswith("0")
    assert _refused_at("X:1\nM: 10/3\n", {}).endswith("\n")      # (3 could still have become 32)
    assert _refused_at(head + "A8|\nX2|").endswith("X")
    assert not _accepts(head + "A8|B8:").can_end()
    # a blank line ends the tune only where EOS could
    assert _refused_at(head + "A4\n\n").endswith("\n\n")
    assert _refused_at(head + "A8|\n\n") == ""
    assert _refused_at(head + "A8|\n\nB").endswith("B")


def test_idle_content_is_capped():
    """A model can stay inside the grammar without writing music: barlines with nothing between them, text
    line after text line, quote after quote. Each is capped just above what music21's tunes use."""
    head = H.format(m="4/4", l="1/8", k="D")
    assert _refused_at(head + " | | | | A8|") == ""             # EsAC incipits open with up to 4 empty bars
    assert _refused_at(head + " | | | | |").endswith("|")
    assert _refused_at(head + "A8 |\n| A8|") == ""             # later, one (a line ending, a line starting with |)
    assert _refused_at(head + "A8| | |").endswith("|")
    assert _refused_at(head + "A8|\nW:one\nW:two\nA8|\nw:la\n%c\n") == ""
    assert _refused_at(head + "A8|\nW:one\nW:two\nW:x").endswith("W:")    # (W is a decoration, W: a third line)
    assert _refused_at(head + "A8|\nN:x").endswith("N:")   # abc2midi: "Field not allowed in tune body"
    assert _refused_at(head + "A8|\nZ:x").endswith("Z:x")  # (Z: could be a multi-bar rest and a barline)
    assert _refused_at("X:1\nM:1234", {}).endswith("3")        # a meter cannot run on ...
    assert _refused_at("X:1\n" + "T:a\n" * 6 + "T:", {}).endswith("T")   # ... nor a header field repeat
    assert _refused_at(head + "A8|\n%a\n%b\n%").endswith("%")
    six = "GABCDE"                                                  # _MAX_IDLE = 6 idle items before a note
    assert _refused_at(head + "".join(f'"{c}"' for c in six) + "A8|") == ""
    assert _refused_at(head + "".join(f'"{c}"' for c in six) + '"F').endswith('"')
    assert _refused_at(head + "A8|" + "[K:G]" * 6 + "[K:").endswith("K")
    assert _refused_at(head + "A8|\n" + "K:G\nM:3/4\nL:1/4\n" + "E3|") == ""  # K:/L:/M:/V: lines: 3 in a row
    assert _refused_at(head + "A8|\n" + "K:G\nK:D\nK:C\n" + "K:").endswith("\nK:")  # (K alone: a decoration)
    # lengths as music21 writes them: numerators 1-16, 24, 32; at most 7 before a "/"; denominators up to 16
    for ok in ("A16|", "A/16 A7/16 A7|", "A3/2 A7/4 A3/|", "z32|"):
        assert _refused_at(H.format(m="none", l="1/8", k="D") + ok) == "", ok
    for bad in ("A17", "A42", "A8/", "A/32", "A/3", "A222"):
        assert _refused_at(H.format(m="none", l="1/8", k="D") + bad) != "", bad
    assert _refused_at(head + "A8|()").endswith("()")                         # a slur over nothing
    assert _refused_at(head + "A8|" + '("^x"' * 3 + "(").endswith('"(')         # slurs count too


# abc2midi 4.84's own rules beyond bar time, each case fed to the real binary: (body, abc2midi errs)
ABC2MIDI_RULES = [
    ("A>B c6|", False), ("A>B2 c5|", True), ("A>B>c d5|", True), ("A2>B2 c4|", False), ("A/>B/ c7|", False),
    ("[AC]>[BD] c6|", False), ("[AC]2>[BD] c4 z/|", False), ("A>(3Bcd e4 z2|", True), ('"G"A>"C"B c6|', False),
    ("|: A8 | c8 |]", True), ("|: A8 | c8 :|", False), (":: A8 | c8 |]", True), ("A8 :| c8 |]", False),
    ("|:A8|:B8:|", True), ("|: A8 :: B8 :|", False), ("A8 :|: B8 :|", False), ("|: A8 |] B8 :|", False),
    ("|: A8 |1 B8 :|2 c8 |]", False), ("|: A8 |1 B8 |2 c8 |]", True), ("A8 |1 B8 :|2 c8 |", False),
    ("A8 |1 B8 |", True), ("[1 A8 :|[2 B8|]", False), ("|1 A8 | [2 B8 |]", True), ("|1 A8 || [2 B8 |]", True),
    ("A8 ::1 B8 :|", True), ("A8 |]1 B8 :|", True), ("A8 :||2 B8 |]", True), ("|: A8 |1,3 B8 :|2 c8 |]", False),
    ("|: A8 |1 B8 :|2 c8 :|3 d8 |]", False), ("A8 |1 B8 :|2 c8 |3 d8 |]", True),
    ("A8 |1 B8 :|2 c8 | d8 | e8 |1 f8 :|2 g8|]", True), ("A8 |1 B8 :|2 c8 :| d8 | e8 |1 f8 :|2 g8|]", False),
    ("T A8|", True), ("TA8|", False), ("T(A8)|", True), ('T"C"A8|', True), ("T{c}A8|", True), ("T!p!A8|", True),
    ("uvA8|", False), ("H.A8|", False), ("T[AC]8|", True), ("H[AC]8|", False), ("~A8|", False), ("Tz4 A4|", False),
    (".(A8)|", False), ("..(A8)|", True), (".T(A8)|", True), ("kA8|", False), ("(uA8)|", False), ("k(A8)|", False),
    ("OVA8|", True), ('"Am7/G"A8|', False), ('"G is"A8|', False), ('"^Fine"A8|', False), ('"N.C."A8|', True),
    ('"Gmaj"A8|', True), ('"G/"A8|', True), ('"Bbm7b5"A8|', False), ("(3A(3Bc d5|", True), ("(3ABc d6|", False),
    ("A'8|", True), ("a'8|", False), ("c,8|", True), ("C,8|", False), ("A8 |:| B8 |]", True), ("A8 ||] B8 |]", True),
    ("A8 ::| B8 |]", True), ("A8 |:| B8 :|", False), ("A8 :|] B8 |]", False),
    ("A8 :| B8 |1 c8 :|2 d8 |]", True), ("A8 :| |: B8 |1 c8 :|2 d8 |]", False), ("A8 |2 B8 :|", True),
    ("A8 || B8 |1 c8 :|2 d8 |]", False), ("A8 :|2 B8 :|", True), ("A8 :| B8 :|", False),
    # ties: the next note (or chord) holds the tied pitch; an accidental carries over the tie
    ("A4-A4|", False), ("A4- z4|", True), ("A4-|z8|", True), ("A8-|]", True), ("A4- B4|", True),
    ("A4-a4|", True), ("a'4-a4|", True), ("A,4-A,4|", False), ("A4-A,4|", True), ("^A4-|A4 z4|", False),
    ("A4-^A4|", True), ("[AC]4-[CA]4|", False), ("[AC]4-A4|", True), ("A4-[AC]4|", False),
    ("[AC]4-[AE]4|", True), ("[A-C]4 [AC]4|", False), ("[A-C]4 [CE]4|", True), ("A4-{g}A4|", True),
    ("A4-&A4|", True), ('A4-"C"A4|', False), ("A4-|1A4:|2A4|]", False), ("A4-(3ABc B2|", False),
    ("A4 B4-|\nB8|]", False), ("A2B2c2d2-|]", True), ("A4-A4-|]", True), ("A8 ::|: B8 :|", True),
    ("A8 ::| B8 :|", False),
    # a staccato note takes no tie (a chord does); "T." is abc2midi's exception, refused here too
    (".A4-A4|", True), ("H.A4-A4|", True), (".HA4-A4|", True), ("HA4-A4|", False), (".[AC]4-[AC]4|", False),
    (".A2 B4-B2|", False),
    # a one-letter decoration is followed by a chord, never an inline field or barline ("Malformed note")
    ("A8| T[K:G] B8|", True), ("A8| [K:G] B8|", False), ("A8 .[| B8|]", True), ("A2 .[CE]B5|", False),
    ("A.[L:1/16]B14|", True), ("A[L:1/16]B14|", False),
    # "\\" and "*" only at a line's end (abc2midi: "'\\' in middle of line ignored")
    ("A4 \\ B4|", True), ("A4 B4|\\\n", False), ("A4 * B4|", True), ("A4 B4| **\n", False),
    # a chord symbol starts abc2midi's accompaniment (4/4: "fzczfzcz", one slot an eighth): a last bar that
    # stops inside a sounding slot is its error "Sustained notes beyond end of track"
    ('A3/2|"C"A8|A6A/|]', True), ("A3/2|A8|A6A/|]", False), ('A/|"C"A8|A7A/|]', False),
    ('A|"C"A8|A7|]', False),
    # grace groups: notes (with a note's own octave marks) and chords; no ending or barline inside
    ("{[ce]}A8|", False), ("{/c}A8|", False), ("{g/a/}A8|", False), ("{c,}A8|", True), ("{c[1}A8|", True), ("{c//2}A8|", True),
    # a staccato in a chord goes right before its note; no roll there
    ("[.fe]A7|", False), ("[f .e]A7|", False), ("[f.]A7|", True), ("[. f]A7|", True), ("[~f]A7|", True),
    # once a ":|" came, "::" waits for a "|:" (even after "||"); an ending inside a bar takes no "&" next
    ("A8:|B8::c8:|", True), ("A8:|B8||c8::d8:|", True), ("|:A8:|:B8::c8:|", True), ("A8:|B8|:c8::d8:|", False),
    ("|:A8::B8::c8:|", False), ("A7g[1&B8:|", True), ('A4"^a%b"B4|', True),
]


@pytest.mark.parametrize("body,errs", ABC2MIDI_RULES)
def test_what_abc2midi_refuses_the_constraint_refuses(body, errs):
    """Broken rhythm (equal written lengths, no chained pairs, no tuplet in a pair), repeats (closed before
    the end, never opened twice), numbered endings and one-letter decorations: a tune the constraint lets
    end is one abc2midi converts without an error, and the cases abc2midi takes stay allowed."""
    tune = H.format(m="4/4", l="1/8", k="C") + body + "\n"
    r = abc_to_midi(tune)
    assert bool(r.errors) == errs, (body, r.errors)   # the table is abc2midi's verdict, checked each run
    st = _accepts(tune)
    assert (st is not None and st.can_end()) == (not errs), (body, _refused_at(tune), st and st.describe())


# header lines abc2midi reads as commands, each fed to the real binary: (line, abc2midi errs)
ABC2MIDI_HEADER_RULES = [
    ("Q:1/4=120", False), ('Q:1/4=120 "Slow"', False), ("Q:96", False), ('Q:"Slow" 1/4=60', False),
    ("Q:1/4=120 % brisk", False), ('Q:"Slow"', True), ("Q:0", True), ("Q:1/4=0", True), ("Q:xyz", True),
    ("Q:1/4 3/8=120", True), ('Q:1/4=120 "Slow', True), ("Q:2/22=60", True), ("Q:3/8=60", False), ('Q:"Andantino"', False),
    ("P:2", True), ("P:(AB)2", True), ("P:A(AB)2", True),
    ("I: :: ::", True), ("I:abc-version 2.1", True), ("U:G", True), ("U:T=", True),
    ("P:ABA", True), ("P:Verse", True), ("K:Daeo", False), ("K:E phr -8va", True), ("K:E phr treble8", False),
    ("K:Dm exp ^f _b", False), ("K:D maj x1", True), ("K:D maj clef=bass8", False), ("K:D maj G:", True),
    # accidentals right after the mode word; no mode word (major) before clef / exp words
    ("K:Dmix=c", False), ("K:Dm=c ^g", False), ("K:C^A", True), ("K:D =c", False), ("K:D ^f", False),
    ("K:G bass", False), ("K:G treble", False), ("K:D exp ^f _b", False), ("K:Ebass", True), ("K:Gx", True),
    ("M:none", False), ("M:None", False), ("M:NONE", True),
]


@pytest.mark.parametrize("line,errs", ABC2MIDI_HEADER_RULES)
def test_header_lines_abc2midi_reads_as_commands(line, errs):
    """Q: (a tempo abc2midi can read), I: U: m: (commands and macros: refused), P: (a part order of capitals,
    each part labelled in the body) and K: (key, mode, then clef words only): what abc2midi errs on is refused
    and the rest stays allowed. "P:ABA" errs because the body labels no part; with the labels it is allowed."""
    if line.startswith("K:"):
        tune = "X:1\nT:Fixture\nM:4/4\nL:1/8\n" + line + "\nA8|]\n"
    elif line.startswith("M:"):
        tune = "X:1\nT:Fixture\n" + line + "\nL:1/8\nK:C\nA8|]\n"
    else:
        tune = "X:1\nT:Fixture\n" + line + "\nM:4/4\nL:1/8\nK:C\nA8|]\n"
    r = abc_to_midi(tune)
    assert bool(r.errors) == errs, (line, r.errors)
    st = _accepts(tune, {})
    assert (st is not None and st.can_end()) == (not errs), (line, _refused_at(tune, {}))
    for order in ("ABA", "(AB)2", "A.B2 A % da capo"):
        parts = f"X:1\nP:{order}\nM:4/4\nL:1/8\nK:C\nP:A\nA8|]\nP:B\nB8|]\n"
        assert not abc_to_midi(parts).errors and _accepts(parts, {}).can_end(), order


def test_a_steered_ending_ends_the_tie_it_is_in():
    """``finish_text`` from inside a tie writes the note (or chord) the tie waits for -- over a barline when
    the bar is full -- so a steered tune ends where abc2midi finds every tied note."""
    for body, want in (("A4-", "A4|]"), ("A8-", "|A8|]"), ("[AC]4-", "[AC]4|]"), ("^c2 A2-", "A4|]"),
                       ("|: A8-", "|A8:|")):
        tune = H.format(m="4/4", l="1/8", k="C") + body
        st = _accepts(tune)
        assert st is not None and st.finish_text() == want, body
        assert st.after(want).can_end() and not abc_to_midi(tune + want + "\n").errors, body


def test_a_hurried_header_reaches_its_key():
    """Once a header has used its share of the budget (the processor sets ``hurry``), only the asked fields
    and K: may start a line and an unasked value ends within 40 chars, so a model that writes "T:T:T:..." or
    "B: G" lines still reaches its tune."""
    st = _accepts("X:1\nT:" + "ab" * 30, {"M": "6/8"})
    assert st is not None
    st.hurry = True
    assert st.after("c") is None and st.after("\n") is not None            # past 40 chars: the line ends
    st = st.after("\n")
    assert st.after("B") is None and st.after("T") is None and st.after("K") is None   # M: was asked
    st = st.after("M:6/8\n")
    assert st.after("B") is None and st.after("K:D\n").phase == "body"
    assert _accepts("X:1\n%" + "c" * 160 + "\n", {}) is not None
    assert _accepts("X:1\n%" + "c" * 161, {}) is None                       # comments are capped too


def test_impossible_requests_name_the_field():
    for fields, word in (({"M": "0/4"}, "M:0/4"), ({"L": "1/0"}, "L:1/0"), ({"K": "H"}, "K:H"),
                         ({"K": "Q minor"}, "K:Q minor"), ({"mode": "sideways"}, "mode")):
        with pytest.raises(ConstraintError, match=word.replace("|", r"\|")):
            validate_fields(fields)
    assert validate_fields({"M": "C|", "L": "1/16", "K": "F#m", "T": "The Kesh", "R": "jig"})


# -------------------------------------------------------------------- the music21 corpus property


def test_real_tunes_abc2midi_accepts_stay_allowed():
    """Every prefix of every tune of a deterministic sample of music21's corpus that abc2midi converts
    without a bar warning is allowed, char by char, under the tune's own header fields -- except where the
    tune does not keep time by the one bar checker, or breaks a written rule (benchmarks.constraint_property
    names each refusal's class; "other" would be a refusal of real music). 300 tunes, ~15 s (abc2midi runs
    once per tune). The whole corpus: ``python -m benchmarks.constraint_property``."""
    from data_preprocess.corpus import iter_tunes

    tunes = random.Random(0).sample([t.text for t in iter_tunes("music21")], 300)
    res = corpus_property(tunes, workers=1)
    assert res["abc2midi_clean_bars"] >= 100, res
    assert res["refused_by_class"]["other"] == 0, res["refused"]
    assert res["constraint_accepts"] >= res["abc2midi_clean_bars"] - 2, res


def test_each_refusal_of_a_clean_tune_is_put_in_its_class():
    """The classes of benchmarks.constraint_property, on the music21 tunes that fall in each (abc2midi
    converts them without a bar warning): a line past its bar, unbarred music, a header text line, an end in
    an incomplete bar, empty bars past the cap -- each one refused, none left as "other"."""
    from benchmarks.constraint_property import check_corpus_tune

    head = "X:1\nT:t\nM:4/4\nL:1/8\nK:G\n"
    cases = {
        "bars": [head + "GABc dedB cBAG\nd8\nGABc d4\n",                 # a line past its bar, no "|"
                 "X:1\nT:t\nM:C|\nL:1/2\nK:G dor\nG2 B2 A2 G2 d3 c/ B/ c2 B2\n"],  # unbarred (Josquin)
        "header_text": ["X:1\nT:t\nM:C\nL:1/8\nI :: ::\nK:D\nf2A>A e2d>e|f2A>A dBBg|]\n"],
        "incomplete_end": [head + "G8|A8|B4\n\nc8|\n"],
        "empty_bars": ["X:1\nT:t\nM:none\nL:1/8\nK:D\nABcd efg |  |  |  |\n"],
    }
    for cls, tunes in cases.items():
        for t in tunes:
            r = check_corpus_tune(t)
            assert r["abc2midi"] == "ok" and not r["accepted"] and r["class"] == cls, (cls, t, r)


# ------------------------------------------------------------------------------------ prompt fields


@pytest.mark.parametrize("prompt,want", [
    ("a jig in D major, 6/8", {"R": "jig", "K": "D", "M": "6/8"}),
    ("a reel in G", {"R": "reel", "K": "G"}),
    ("a slip jig in E minor called The Kesh", {"R": "slip jig", "M": "9/8", "K": "Em", "T": "The Kesh"}),
    ("Write something in 6/8 time in the key of B flat", {"M": "6/8", "K": "Bb"}),
    ("a waltz in a minor key", {"R": "waltz", "M": "3/4", "mode": "min"}),
    ("Meter C / Key D / Note Length 1/8 / Rhythm reel", {"M": "C", "K": "D", "L": "1/8", "R": "reel"}),
    ("Compose a folk tune in ABC notation in F sharp minor with a 2/4 time signature.", {"K": "F#m", "M": "2/4"}),
    ("X:1\nT:Morning\nM:6/8\nL:1/8\nK:D\n", {"T": "Morning", "M": "6/8", "L": "1/8", "K": "D"}),
    ("Write me a nice melody.", {}),
])
def test_extract_fields(prompt, want):
    assert extract_fields(prompt) == want


def test_every_sft_template_round_trips():
    """Each text->music template of data_preprocess.sft, filled from real tunes' metadata, gives back
    exactly the fields it was made from."""
    from data_preprocess.corpus import iter_tunes
    from data_preprocess.sft import T2M, describe_key, tune_fields, with_article

    letter = {"key": "K", "meter": "M", "title": "T", "rhythm": "R", "origin": "O"}
    used: dict[int, int] = {}
    for t in iter_tunes("music21"):
        if len(used) == len(T2M) and min(used.values()) >= 30:
            break
        f = tune_fields(t)
        vals = {**f, "a_rhythm": with_article(f["rhythm"]) if f["rhythm"] else None}
        for i, (tpl, req) in enumerate(T2M):
            if not all(f[r] for r in req):
                continue
            got = extract_fields(tpl.format(**vals))
            assert set(got) == {letter[r] for r in req}, (tpl, vals, got)
            for r in req:
                v = got[letter[r]]
                assert (describe_key(v) if r == "key" else v) == f[r], (tpl, r, v, f[r])
            used[i] = used.get(i, 0) + 1
    assert set(used) == set(range(len(T2M))), used


# ------------------------------------------------------------------------------------- tokenizers


def test_token_texts_concatenate_to_the_decoded_text(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = token_texts(tok)
    tune = CONSTRUCTS["chords"] + 'T:Caf\u00e9 \u266f\n"\u00c9"A8|]\n'
    ids = tok.encode(tune, add_special_tokens=False)
    joined = "".join(texts[i] for i in ids)
    assert joined.lstrip(" ") == to_machine_text(tok.decode(ids)).lstrip(" ")
    assert texts[tok.eos_token_id] is None and texts[tok.pad_token_id] is None


def test_a_tokenizer_that_cannot_spell_a_barline_fails_at_start(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "</s>"] + list("X:K\n0123456789/ABCDEFGabcdefg "))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(ConstraintError, match=r"'\|'"):
        ABCConstraintProcessor(tok, {}, ["X:1\n"])


# ------------------------------------------------------------------------- generation with a model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from inference.loading import load_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    torch.set_num_threads(n)


def _barred_prefix(text: str, fields: dict) -> str:
    """The generated text up to its last barline (every bar before it closed), checked char by char."""
    st = AbcState(validate_fields(fields))
    best = ""
    mt = to_machine_text(text)
    for i, c in enumerate(mt):
        assert st.feed(c), f"generated text refused at {i}: {mt[max(0, i - 30):i + 1]!r}"
        if st.mode == "bar" and st.phase == "body":
            best = mt[:i + 1]
    return best.encode("latin-1").decode("utf-8", "replace")


def test_random_model_under_the_constraint_keeps_time(tiny):
    """A randomly initialised model writes nothing like ABC on its own; constrained, every bar it writes
    checks out with benchmarks.abc_metrics.check_bars and the requested header is there."""
    from inference.generation import SamplingConfig, generate_batch

    header = "X:1\nT:Test\nM:6/8\nL:1/8\nK:D\n"
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=400, seed=0)
    prompts = [header, "Compose a reel in G titled Test", header + "|:A2B c2d|", "X:2\nM:3/4\nL:1/4\nK:Em\nE"]
    recs = generate_batch(tiny.model, tiny.tokenizer, prompts, cfg, constrain="abc")
    bars = 0
    for r, prompt in zip(recs, prompts):
        prefix = prompt if prompt.startswith("X:") else ""
        c = r["constraint"]
        assert not c["stop"].startswith("no token"), (c, r["output"][-60:])
        full = prefix + r["output"]
        whole = _barred_prefix(full.lstrip(), c["fields"])
        if whole:
            bc = check_bars(whole)
            assert bc.n_match == bc.n_bars, (bc.mismatches, whole)
            bars += bc.n_bars
        if c["stop"] == "eos":
            assert c["satisfied"] and check_bars(full).consistent is not False
    assert recs[1]["constraint"]["fields"] == {"R": "reel", "K": "G", "T": "Test"}
    assert recs[3]["constraint"]["fields"] == {"M": "3/4", "L": "1/4", "K": "Em"}
    assert bars > 0


def test_a_tune_is_steered_to_its_end_before_the_budget_runs_out(tiny):
    """Near max_new_tokens only notes, rests and barlines are allowed, and EOS alone once a bar is complete:
    even a random model's rows end at EOS as whole tunes (every bar full). (Whether abc2midi plays them
    without errors is measured on a trained model by benchmarks.abc_quality: a random model's text passes
    the grammar's letter but not abc2midi's taste, e.g. unknown !decorations!.)"""
    from inference.generation import SamplingConfig, generate_batch

    header = "X:1\nT:Test\nM:6/8\nL:1/8\nK:D\n"
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=160, seed=0)
    prompts = [header, header + "|:A2B c2d|", "X:2\nM:3/4\nL:1/4\nK:Em\nE", header]
    recs = generate_batch(tiny.model, tiny.tokenizer, prompts, cfg, constrain="abc")
    for r, prompt in zip(recs, prompts):
        c = r["constraint"]
        assert c["stop"] == "eos" and c["satisfied"], (c, r["output"][-80:])
        full = prompt + r["output"]
        bc = check_bars(full)
        assert bc.n_bars > 0 and bc.n_match == bc.n_bars, (bc.mismatches, full)
    assert sum(r["constraint"]["steered_to_end"] for r in recs) >= 2   # (a row may reach a legal end by itself)


def test_rows_of_one_batch_keep_their_own_requests(tiny):
    """Rows asking for different fields share the processor's caches: each must still get its own header
    (a state key without the request once gave a row the previous row's key and meter)."""
    from inference.generation import SamplingConfig, generate_batch

    prompts = ["Write a tune in D minor in 4/4 time", "Write a tune in C major in 3/4 time",
               "Write a tune in B flat major in 6/8 time"]
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=120, seed=0)
    recs = generate_batch(tiny.model, tiny.tokenizer, prompts, cfg, constrain="abc")
    for r, (k, m) in zip(recs, [("Dm", "4/4"), ("C", "3/4"), ("Bb", "6/8")]):
        assert r["constraint"]["fields"] == {"K": k, "M": m}
        out = r["output"]
        assert f"M:{m}" in out.replace(" ", "") or "K:" not in out, out    # the meter line, once it is written
        if "\nK:" in out:
            header, _ = split_header_body(out[out.index("X:"):])
            assert header["K"] == k and header["M"] == m, out


def test_memorised_tune_passes_and_a_different_meter_is_enforced(tiny_model_dir, tmp_path):
    """The fine-tuned fixture model (tests/test_predict_fixtures.py) answers its prompt with the memorised
    tune: allowed as it is under the prompt's fields (K:D); asked for 3/4 as well, it must write M:3/4
    and bars of three quarters."""
    from test_predict_fixtures import PROMPT, REPLY, memorised_model

    from data_preprocess.chat_format import ChatFormat
    from inference.generation import SamplingConfig, generate
    from inference.loading import load_model

    loaded = load_model(str(memorised_model(tiny_model_dir, tmp_path / "memo")), device="cpu", dtype="fp32")
    start = ChatFormat(loaded.tokenizer).prompt_ids([{"role": "user", "content": PROMPT}])
    cfg = SamplingConfig(temperature=0, max_new_tokens=120)
    assert extract_fields(PROMPT) == {"K": "D"}
    same = generate(loaded.model, loaded.tokenizer, start, cfg, constrain="abc")
    assert same["output"] == REPLY
    assert same["constraint"] == {**same["constraint"], "fields": {"K": "D"}, "satisfied": True, "stop": "eos"}
    other = generate(loaded.model, loaded.tokenizer, start, SamplingConfig(temperature=0, max_new_tokens=300),
                     constrain="abc", fields={"M": "3/4", "K": "D"})
    tune = other["output"][other["output"].index("X:"):]
    header, _ = split_header_body(tune)
    assert header["M"] == "3/4" and header["K"] == "D", tune
    barred = _barred_prefix(tune, {"M": "3/4", "K": "D"})  # every char allowed
    bc = check_bars(barred or tune)
    assert bc.n_match == bc.n_bars, (tune, bc.mismatches)


def test_no_allowed_token_ends_the_row_with_a_reason(tiny):
    """When another processor has banned every token the constraint allows, the row ends with EOS and
    the reason is recorded: no hang, no traceback."""
    from transformers import LogitsProcessorList

    tok = tiny.tokenizer
    banned = [i for i in range(len(tok)) if i != tok.eos_token_id]
    proc = ABCConstraintProcessor(tok, {}, ["hello"])
    enc = tok("hello", return_tensors="pt")
    out = tiny.model.generate(**enc, max_new_tokens=5, do_sample=False, suppress_tokens=banned,
                              logits_processor=LogitsProcessorList([proc]), pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    assert out[0, -1].item() == tok.eos_token_id
    rep = proc.report(0)
    assert rep["stop"].startswith("no token allowed") and not rep["satisfied"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def test_predict_batch_records_the_constraint_and_refuses_impossible_requests(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("A jig in D major titled Sky\n")
    out = tmp_path / "preds.json"
    args = [sys.executable, "-m", "inference.predict", "--base_model", str(tiny_model_dir), "--data_file", str(data),
            "--predictions_file", str(out), "--with_prompt", "--max_new_tokens", "40", "--seed", "0",
            "--constrain", "abc"]
    p = subprocess.run(args, check=False, capture_output=True, text=True, env=ENV, timeout=300, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    pred = json.loads(out.read_text())[0]
    assert pred["constraint"]["fields"] == {"R": "jig", "K": "D", "T": "Sky"}
    assert set(pred["constraint"]) >= {"fields", "satisfied", "stop"}
    data.write_text("A jig in D major\nA tune in 0/4 time\n")
    p = subprocess.run(args, check=False, capture_output=True, text=True, env=ENV, timeout=300, cwd=str(REPO))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "prompts.txt:2" in p.stderr and "M:0/4" in p.stderr


def test_demo_chat_takes_constrain_and_refuses_impossible_requests(tiny, tmp_path):
    """The demo's JSON API (the page's checkbox sends ``"constrain": "abc"``): the done event carries the
    constraint record; an impossible request is a 400 naming the field, before any generation."""
    import threading
    import urllib.error
    import urllib.request

    from inference.demo import DemoApp, serve
    from inference.generation import SamplingConfig

    app = DemoApp(tiny, SamplingConfig(max_new_tokens=24, seed=0), tmp_path, "tiny", wav=False)
    server = serve(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        def post(body):
            req = urllib.request.Request(url + "/api/chat", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return [json.loads(x) for x in r.read().decode().splitlines() if x.strip()]

        events = post({"messages": [{"role": "user", "content": "a reel in G"}], "constrain": "abc"})
        done = events[-1]
        assert done["type"] == "done", events[-1]
        assert done["constraint"]["fields"] == {"R": "reel", "K": "G"} and "stop" in done["constraint"]
        plain = post({"messages": [{"role": "user", "content": "a reel in G"}]})[-1]
        assert plain["type"] == "done" and "constraint" not in plain
        with pytest.raises(urllib.error.HTTPError) as e:
            post({"messages": [{"role": "user", "content": "a tune in 0/4 time"}], "constrain": True})
        assert e.value.code == 400 and "M:0/4" in json.loads(e.value.read())["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_benchmarks_run_the_model_alone_and_constrained(tiny_model_dir, tmp_path):
    """abc_quality --constrain both: two columns (model / constrained) with tokens/s and the constrained
    side's satisfaction rate; generate_speed --constrain abc: a tunesmith_abc path timed next to tunesmith."""
    from benchmarks import abc_quality, generate_speed

    out = tmp_path / "q.json"
    assert abc_quality.main(["--model", str(tiny_model_dir), "--n", "2", "--max_new_tokens", "24", "--device", "cpu",
                             "--no-music21", "--constrain", "both", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["summary"]["model"]["n"] == 2 and res["summary"]["constrained"]["n"] == 2
    assert res["summary"]["constrained"]["constraint_satisfied"] is not None
    assert "constraint_satisfied" not in res["summary"]["model"]
    assert set(res["generation_speed"]) == {"model", "constrained"}
    assert all(v["tokens_per_s"] > 0 for v in res["generation_speed"].values())
    r = generate_speed.main(["--model", str(tiny_model_dir), "--batch", "2", "--new_tokens", "6", "--prompt_len", "16",
                             "--paths", "tunesmith", "--repeats", "1", "--constrain", "abc", "--device", "cpu",
                             "--output", str(tmp_path / "s.json")])
    assert set(r["results"]) == {"tunesmith", "tunesmith_abc"} and r["results"]["tunesmith_abc"]["vs_tunesmith"] > 0
    with pytest.raises(ArgumentError, match="needs a model dir"):
        generate_speed.main.__wrapped__(["--model", "llama-tiny", "--constrain", "abc"])


def test_a_tune_of_rests_cannot_end_and_the_extractor_agrees():
    """abc2midi reads a line-start "Z::" as a multi-bar rest and a repeat (it warns: "either a :| repeat or a
    field command"), so the constraint and inference.abc_extract take it as music; a reply of rests alone
    may not end (it is no tune), and the extractor finds no tune in one either."""
    from inference.abc_extract import extract_abc

    head = H.format(m="4/4", l="1/8", k="D")
    rests = head + 'Z::"C/D"\nZ::"A/B"\n:|'
    st = _accepts(rests)
    assert st is not None and not st.can_end()
    assert extract_abc(rests) == []
    tune = head + 'Z::"C/D"\nA8:|'
    assert _accepts(tune).can_end()
    assert extract_abc(tune) == [tune + "\n"]
    assert extract_abc(head + "A8|\nZ4|\nB8|]") == [head + "A8|\nZ4|\nB8|]\n"]  # a line of rests is music
    assert abc_to_midi(tune).ok


def test_a_bar_repeated_four_times_makes_the_next_open_otherwise():
    from inference.abc_constraint import opens_with, repeated_bar

    head = H.format(m="6/8", l="1/8", k="G")
    assert repeated_bar(head + "G2G2G2|" * 3) is None                 # 3 in a row: nothing refused yet
    cur, opening = repeated_bar(head + "G2G2G2|" * 3 + "G2 G2 G2 |")  # (spaces do not make a bar different)
    assert (cur, opening) == ("", "G2")
    assert opens_with(cur, " G2", opening) and opens_with("G", "2G", opening)
    assert not opens_with(cur, "A2", opening) and not opens_with(cur, "G4", opening)
    assert not opens_with("G", "3", opening)
    assert repeated_bar(head + "G2G2G2|" * 3 + "G2G2A2|") is None
    assert repeated_bar(head + '"G"G6|' * 4 + '"') == ('"', '"G"G6')  # a quote's '|' is no barline


def test_the_processor_refuses_a_fifth_copy_of_a_bar(tiny):
    """Through the processor with a real tokenizer: logits that want the bar "G2G2G2" again are masked once
    it came four times (and only then); the cap never empties a row (the fallback does not apply it)."""
    tok = tiny.tokenizer
    texts = token_texts(tok)
    two = [i for i, t in enumerate(texts) if t == "2"]
    assert two, "the tiny tokenizer spells '2' alone"
    head = "X:1\nT:x\nM:6/8\nL:1/8\nK:G\n"

    def top_after(reply: str) -> int:
        prompt = tok("tune", add_special_tokens=False, return_tensors="pt").input_ids
        proc = ABCConstraintProcessor(tok, {}, ["tune"], greedy=True)
        scores = torch.zeros(1, len(texts))
        proc(prompt, scores.clone())
        one = {t: i for i, t in reversed(list(enumerate(texts))) if t is not None and len(t) == 1}
        ids = torch.cat([prompt, torch.tensor([[one[c] for c in reply]])], 1)  # (char by char: no "▁" before X)
        scores[0, two] = 10.0  # the model wants "2" most
        out = proc(ids, scores)
        assert proc.states[0].phase == "body" and proc.stop[0] is None
        return int(out[0].argmax())

    assert top_after(head + "G2G2G2|" * 3 + "G") in two
    assert top_after(head + "G2G2G2|" * 4 + "G") not in two


def test_random_walks_the_constraint_lets_end_are_ones_abc2midi_converts():
    """The property check's other direction: a text the constraint lets end is one abc2midi converts without
    an error. Seeded random walks through the state machine from "X:1" (weighted to music, but any printable
    character may come), wound down to closing characters after 300 chars and closed by ``steered_ending``
    (what the processor writes near the budget), are fed to the real binary. Each abc2midi rule in the tables above was once such a
    finding; a walk that cannot end within 4x the length fails too (a dead end or a trap)."""
    pool = sorted(set([chr(i) for i in range(32, 127)] + ["\n"] + [
        "|:", ":|", "::", "|]", "||", "[1", "[2", ":|2", "|1", "(3", '"A"', '"Am"', "P:A", "[M:3/4]", "[K:G]",
        "[L:1/16]", "V:2\n", "Z2", "x2", "!trill!", "A2", "B/", "c>d", "d3/2", "[ceg]", "{g}", "-A", "Q:1/4=120",
        "K:D\n", "M:6/8\n", "L:1/8\n"]))
    weight = {**{c: 12 for c in "abcdefgABCDEFGz"}, **{c: 6 for c in "234/"},
              **{c: 4 for c in ["|", " ", "|:", ":|", "|]", "||", "[1", ":|2", "\n"]}}
    closers = {"|", "|]", ":|", "]", '"', "!", "}", ")", "\n", "A", "z", "2", "/", "+", ":"}
    rng = random.Random(0)
    ended, bad = 0, []
    for walk in range(6):
        st = AbcState(validate_fields({})).after("X:1\n")
        text = "X:1\n"
        while len(text) < 1200:
            if len(text) > 300 and st.mode in ("music", "len", "bar", "quote", "b_start"):
                fin = steered_ending(st)
                done = fin is not None and st.after(to_machine_text(fin))
                if done and done.can_end():
                    text += fin
                    break
            opts = [(p, n) for p in pool if (n := st.after(to_machine_text(p))) is not None]
            assert opts, (walk, text[-80:], st.describe())
            if len(text) > 300:
                opts = [o for o in opts if o[0] in closers] or opts
            p, st = rng.choices(opts, weights=[weight.get(o[0], 1) for o in opts])[0]
            text += p
        else:
            pytest.fail(f"walk {walk} never ended: {text[-80:]!r} ({st.describe()})")
        ended += 1
        r = abc_to_midi(text + "\n")
        if r.errors:
            bad.append((text, r.errors[:3]))
    assert ended == 6 and not bad, bad

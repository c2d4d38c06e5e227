"""ABC checks (bar durations, repeats, copies, compliance) and the abc_quality command."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from benchmarks import abc_metrics as am
from benchmarks import abc_quality as aq
from data_preprocess.hub import ArgumentError

H = "X:1\nT:t\n"

CORRECT = {
    "pickup, repeats, numbered endings": H + "M:6/8\nL:1/8\nK:D\nA|:dAF A2B|c3 d2e|fed cBA|1 d3 d2:|2 d3 d2A||\n"
                                             "|:fga agf|e3 e2f|gfe dcB|A3 A2:|\n",
    "section pickup before |:": H + "M:4/4\nL:1/4\nK:G\nG A B c|d4|B2 G2|G3 d|:e d c B|A4:|\n",
    "triplets and (p:q:r": H + "M:4/4\nL:1/8\nK:G\n(3GAB c2 d4|(3:2:3G2A2B2 c2 d2|(5ABcde c2 d4|G8|]\n",
    "chords and chord lengths": H + "M:3/4\nL:1/8\nK:C\n[CEG]2 [DF]2 [EGc]2|[C2E2G2] z4|[CEG]6|[C/E/]3 z3|]\n",
    "meter and unit changes": H + "M:3/4\nL:1/4\nK:C\nC D E|[M:4/4] C D E F|\nM:2/4\nG A|[L:1/8] cdef|c4|]\n",
    "default unit length": H + "M:2/4\nK:C\nCDEF GABc|c8|]\n",
    "broken rhythm, lengths, decorations": H + "M:4/4\nL:1/8\nK:C\n!trill!A>B c<d ~e2 .f2|\"Am\"c3/2d/ e4 z2|"
                                               "{g}A//B//c/ d2 e4 z|]\n",
    "voices and overlay": H + "M:2/4\nL:1/8\nK:C\nV:1\ncdef|g4|]\nV:2\nC4|E2 G2 & c4|]\n",
    "multi-bar rest, ties, slurs": H + "M:4/4\nL:1/8\nK:C\nZ2|(CDEF G4-)|G8|]\n",
    "C| meter": H + "M:C|\nL:1/8\nK:D\nd2f2 a2f2|d8|]\n",
}
BROKEN = {
    "bar too long": (H + "M:4/4\nL:1/8\nK:C\nCDEF GABc d|c8|]\n", 1),
    "short bar in the middle": (H + "M:3/4\nL:1/8\nK:C\nC2 D2 E2|F2 G2|A2 B2 c2|d6|]\n", 1),
    "wrong meter": (H + "M:3/4\nL:1/8\nK:C\nCDEF GABc|cdef gabc|c8|]\n", 3),
    "triplet bar too long": (H + "M:2/4\nL:1/8\nK:C\n(3CDE F G2|A2 B2|c4|]\n", 1),
    "long bar after a meter change": (H + "M:4/4\nL:1/4\nK:C\nC D E F|[M:3/4] C D E F|G A B|]\n", 1),
}


@pytest.mark.parametrize("name", list(CORRECT))
def test_correct_tunes_are_consistent(name):
    r = am.check_bars(CORRECT[name])
    assert r.n_bars >= 2 and r.n_match == r.n_bars, (name, r.mismatches)


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_tunes_are_flagged(name):
    tune, n_bad = BROKEN[name]
    r = am.check_bars(tune)
    assert r.n_bars - r.n_match == n_bad, (name, r.mismatches)
    assert r.consistent is False


def test_bar_durations_exact():
    bars = am.bars_of(CORRECT["triplets and (p:q:r"])
    assert [str(b.duration) for b in bars] == ["1", "1", "1", "1"]
    bars = am.bars_of(CORRECT["pickup, repeats, numbered endings"])
    assert str(bars[0].duration) == "1/8" and bars[0].right == "repeat"
    assert am.check_bars(H + "M:none\nL:1/8\nK:C\nCDE|FGABc|]\n").n_unscorable == 2


def test_headers_repeats_keys():
    assert am.meter_value("6/8") == am.meter_value("3/4") and am.meter_value("2+3/8") == am.Fraction(5, 8)
    assert am.meter_value("C") == 1 and am.meter_value("none") is None
    assert am.unit_value(None, am.meter_value("2/4")) == am.Fraction(1, 16)
    assert am.has_repeats(CORRECT["section pickup before |:"]) and not am.has_repeats(CORRECT["C| meter"])
    assert am.normalise_key("Em") == am.normalise_key("E minor") == ("E", "min")
    assert am.normalise_key("Bb") == am.normalise_key("B flat major") == ("Bb", "maj")
    assert am.normalise_key("Ador") == ("A", "dor") and am.normalise_key("G clef=treble") == ("G", "maj")
    assert am.compliance(CORRECT["C| meter"], "D", "2/2") == {"key": True, "meter": True, "title": None}
    assert am.compliance(CORRECT["C| meter"], "Dm", "4/4") == {"key": False, "meter": False, "title": None}
    assert am.compliance("X:1\nT: the  Kesh \nK:G\nG4|\n", None, None, "The Kesh")["title"] is True
    assert am.compliance("X:1\nT:Kesh\nK:G\nG4|\n", None, None, "The Kesh")["title"] is False
    tunes = am.split_tunes("% file header\n" + CORRECT["C| meter"] + "\n" + CORRECT["default unit length"])
    assert len(tunes) == 2 and tunes[1].startswith("X:1\nT:t\nM:2/4")


def test_bar_variety():
    drone = "X:1\nM:6/8\nL:1/8\nK:G\n" + "G2G2G2|" * 20 + "\n| | | |A6|]\n"
    assert am.bar_variety(drone) == {"bars": 25, "empty": 4, "distinct": 2, "max_same": 20}
    # quotes may hold "|", lyrics lines are no bars, a leading "|:" opens no empty bar
    tune = 'X:1\nM:4/4\nK:D\n|:"D|x"A8|B8:|\nw: la|la\nc8|B8|B8|]\n'
    assert am.bar_variety(tune) == {"bars": 5, "empty": 0, "distinct": 3, "max_same": 2}


def test_memorisation_exact_and_near_copies():
    train = [CORRECT["pickup, repeats, numbered endings"], CORRECT["broken rhythm, lengths, decorations"]]
    idx = am.MemorisationIndex(train, n=8)
    copy = train[0].replace("X:1\nT:t", "X:99\nT:Another title").replace("|:fga", "|:  fga")
    r = idx.check(copy)
    assert r["exact"] and r["max_overlap"] == 1.0 and r["nearest"] == 0
    near = train[0].replace("e3 e2f", "e3 e2g")
    r = idx.check(near)
    assert not r["exact"] and 0.8 <= r["max_overlap"] < 1.0
    r = idx.check(CORRECT["voices and overlay"])
    assert not r["exact"] and r["max_overlap"] < 0.5


def test_parse_rate_uses_real_abc2midi(tmp_path):
    clean = H + "M:4/4\nL:1/8\nK:C\n|:CDEF GABc|c8:|\n"
    warn = H + "M:2/4\nL:1/16\nK:G\nB2c2f2d2 | c8 | f4d2c2 | B2c2B2G2 | F8\nB4c2c2 | f4d2c2\n"  # bar without barline
    err = H + "M:4/4\nL:1/8\nK:C\nCDEF ?GA#Bc|c8|]\n"
    entries = [{"source": "file", "abc": t} for t in (clean, warn, err)] + [{"source": "file", "abc": None}]
    aq.score_tunes(entries, None, 0.8, use_music21=True)
    assert [e["abc2midi"] for e in entries] == ["clean", "warnings", "errors", "errors"]
    assert "Unrecognized character" in entries[2]["abc2midi_errors"][0]
    assert entries[0]["music21"] is True and entries[3]["music21"] is False
    s = aq.summarise(entries, True, False)
    assert s["parse_rate"] == 0.5 and s["midi_rate"] == 0.75 and s["abc2midi_clean"] == 0.25 and s["abc2midi_warnings"] == 0.25
    assert s["repetition_rate"] == 0.25


def test_read_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Write a jig in D", "key": "D", "meter": "6/8"}\n\n{"prompt": "A reel", "title": "X"}\n')
    assert aq.read_prompts(str(f)) == [{"prompt": "Write a jig in D", "key": "D", "meter": "6/8", "title": None},
                                      {"prompt": "A reel", "key": None, "meter": None, "title": "X"}]
    f.write_text('{"key": "D"}\n')
    with pytest.raises(ArgumentError, match=r"p.jsonl:1: .*'prompt'"):
        aq.read_prompts(str(f))
    b = aq.builtin_prompts(5)
    assert len(b) == 5 and all(p["key"] and p["meter"] for p in b)
    assert [bool(p["title"]) for p in b] == [False, True, False, True, False]  # every other one names a title
    assert all(f'called "{p["title"]}"' in p["prompt"] for p in b if p["title"])


def test_cli_on_abc_file(tmp_path, capsys):
    from conftest import music21_abc_texts

    f = tmp_path / "human.abc"
    f.write_text("\n".join(music21_abc_texts(2)))
    out = tmp_path / "q.json"
    assert aq.main(["--abc_file", str(f), "--n", "12", "--train_corpus", str(f), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    s = res["summary"]["all"]
    assert s["n"] == 12 and s["exact_copy_rate"] == 1.0  # scored against itself: every tune is a copy
    # these files carry "I: :: ::" lines that abc2midi reports as errors while still writing MIDI
    assert s["parse_rate"] <= s["midi_rate"] and s["midi_rate"] > 0.5 and s["bar_consistency"] > 0.5
    assert "abc2midi parse rate" in capsys.readouterr().out


def test_cli_generates_with_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "g.json"
    assert aq.main(["--model", str(tiny_model_dir), "--n", "4", "--max_new_tokens", "40", "--device", "cpu",
                    "--no-music21", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["summary"]["all"]["n"] == 4
    assert res["summary"]["unconditional"]["n"] == 2 and res["summary"]["conditioned"]["n"] == 2
    recs = [json.loads(ln) for ln in Path(res["per_tune"]).read_text().splitlines()]
    assert all(r["prompt"].startswith("X:1") for r in recs if r["source"] == "unconditional")
    assert all(r["abc"].startswith("X:1") for r in recs if r["source"] == "unconditional")
    assert all(r["key"] and "Human: " not in r["prompt"] for r in recs if r["source"] == "conditioned")
    assert res["summary"]["conditioned"]["key_compliance"] is not None


def test_a_line_end_after_a_full_bar_and_colon_lines_read_as_abc2midi_reads_them():
    """A line end right after an exactly full bar stands for its barline (EsAC: one bar per line, no "|"), not
    after a "\\" continuation or mid-bar; "D:: ::" is music (abc2midi plays the D), not a D: field line."""
    head = "X:1\nT:t\nM:3/4\nL:1/8\nK:G\n"
    assert am.check_bars(head + "G2A2B2\nc6\nd4 e2\n").n_match == 3
    assert am.check_bars(head + "G2A2B2\\\nc6|\n").consistent is False        # "\\": the line goes on: 12/8
    assert am.check_bars(head + "G2A2\nB2 c6|\n").consistent is False        # mid-bar: 10/8 in one bar
    assert [b.duration for b in am.bars_of(head + "G6|\nD:: ::\nE2A2B2|\n")][:3] == [Fraction(3, 4), Fraction(1, 8),
                                                                                  Fraction(3, 4)]

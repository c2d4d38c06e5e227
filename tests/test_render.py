"""inference/render.py with the real Debian tools: a hand-written tune -> MIDI with the right notes, audible
WAV of the right length, SVG with a staff and one notehead per note; broken ABC -> errors, no exception."""
from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from inference.render import main, render_text, render_tune, safe_stem

# 16 quarter notes at 120 bpm: 8 s of music; an up-and-down C major scale
SCALE = "X:1\nT:Scale test\nM:4/4\nL:1/4\nQ:1/4=120\nK:C\nC D E F|G A B c|c B A G|F E D C|]\n"
PITCHES = ["C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5", "C5", "B4", "A4", "G4", "F4", "E4", "D4", "C4"]


def test_hand_written_tune_renders_to_midi_wav_svg(tmp_path, artifacts_dir):
    from music21 import converter

    rec = render_tune(SCALE, tmp_path, "scale")
    assert rec["ok"] and rec["errors"] == [], rec
    json.dumps(rec)  # JSON-able record
    assert Path(rec["abc"]).read_text() == SCALE

    # MIDI: parses, with exactly the written notes in order
    notes = list(converter.parse(rec["midi"]).flatten().notes)
    assert [n.pitch.nameWithOctave for n in notes] == PITCHES
    assert all(n.quarterLength == 1.0 for n in notes)

    # WAV: non-silent, 8 s of music plus the synthesiser's release tail
    with wave.open(rec["wav"], "rb") as w:
        rate, n, ch, width = w.getframerate(), w.getnframes(), w.getnchannels(), w.getsampwidth()
        pcm = np.frombuffer(w.readframes(n), dtype={2: np.int16, 4: np.int32}[width]).reshape(-1, ch)
    duration = n / rate
    assert 7.9 <= duration <= 12.0 and rec["wav_seconds"] == pytest.approx(duration, abs=1e-3)
    level = np.abs(pcm.astype(np.float64)).mean(axis=1) / np.iinfo(pcm.dtype).max
    second = [level[i * rate:(i + 1) * rate].mean() for i in range(8)]
    assert min(second) > 1e-3  # sound during every second of the 8 s of music

    # SVG: a staff (one path with 5 horizontal lines) and one filled notehead per quarter note, plus the
    # one of the tempo mark (Q:1/4=120 is engraved as a quarter note "= 120")
    svg = Path(rec["svg"]).read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert any(seg.count("h") >= 5 for seg in svg.split("<path")[1:])
    assert svg.count('xlink:href="#hd"') == 16 + 1 and "= 120" in svg
    (artifacts_dir / "render_scale.svg").write_text(svg)


def test_broken_abc_is_captured_not_raised(tmp_path):
    rec = render_tune("X:1\nK:C\nC(((D|]]]] &&& \n", tmp_path, "broken")
    assert not rec["ok"] and rec["errors"]
    assert any(e.startswith("abc2midi:") for e in rec["errors"]) and any(e.startswith("abcm2ps:") for e in rec["errors"])
    empty = render_tune("", tmp_path, "empty")
    assert not empty["ok"] and empty["errors"] == ["empty ABC: nothing to render"] and empty["midi"] is None
    nothing = render_tune("K:C\n%%%%\n", tmp_path, "nothing")  # no X:, no notes
    assert not nothing["ok"] and nothing["errors"]
    assert safe_stem("../../etc/passwd") == "etc_passwd" and safe_stem("") == "tune"


def test_missing_tool_gives_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))  # the real lookup, on a PATH without the tools
    rec = render_tune(SCALE, tmp_path, "no_tools")
    assert not rec["ok"]
    assert any("sudo apt-get install -y abcmidi" in e for e in rec["errors"])
    assert any("sudo apt-get install -y abcm2ps" in e for e in rec["errors"])


def test_render_text_and_cli(tmp_path, capsys):
    reply = f"Here you go:\n```abc\n{SCALE}```\nand a second one\n\nX:2\nT:Two\nK:G\nGABc d2B2|]\n"
    res = render_text(reply, tmp_path / "t", "reply", wav=False)
    assert res["note"] is None and [r["stem"] for r in res["tunes"]] == ["reply_1", "reply_2"]
    assert all(r["ok"] and r["svg"] and r["wav"] is None for r in res["tunes"])
    none = render_text("I cannot write music today.", tmp_path / "n")
    assert none["tunes"] == [] and "no ABC tune found" in none["note"]

    src = tmp_path / "tune.abc"
    src.write_text(SCALE)
    assert main([str(src), "-o", str(tmp_path / "cli"), "--no-wav"]) == 0
    out = json.loads((tmp_path / "cli" / "tune.render.json").read_text())
    assert out["tunes"][0]["ok"] and (tmp_path / "cli" / "tune.mid").is_file()
    bad = tmp_path / "prose.txt"
    bad.write_text("no music")
    assert main([str(bad), "-o", str(tmp_path / "cli2")]) == 1
    assert "no ABC tune found" in capsys.readouterr().err

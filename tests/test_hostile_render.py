"""Issue 18, render side: ABC written by a model or a stranger reaches abc2midi / abcm2ps / fluidsynth. Nothing
it names is read (file-reading directives stripped, each tool in a fresh sandbox dir), nothing runs unbounded
(time, bytes, music duration; the process group dies with its caller), and `render -o` never overwrites its
input. All with the real Debian tools."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_preprocess import abctools
from inference.render import main, render_tune

REPO = Path(__file__).resolve().parents[1]
LONG = "X:1\nT:long\nM:4/4\nL:1/1\nQ:1/4=10\nK:C\nC400|\n"   # 42 bytes, 160 min of music (a 1.7 GB WAV)


@pytest.fixture
def secret(tmp_path) -> Path:
    f = tmp_path / "private.abc"
    f.write_text("T:SECRET_TITLE_42\nw:secret lyric words\n%%format /etc/passwd\n")
    return f


def test_file_reading_directives_are_stripped_and_reported(tmp_path, secret):
    # the payload is live: unsanitised, the real abc2midi reads the file (its T: lands in the MIDI)
    raw = f"X:1\nT:ok\n%%abc-include {secret}\nM:4/4\nL:1/4\nK:C\nC D E F|]\n"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "t.abc").write_text(raw)
        abctools.run_sandboxed([abctools.require("abc2midi"), "t.abc", "-o", "t.mid"], 20, d, 1 << 24)
        assert b"SECRET_TITLE_42" in (Path(d) / "t.mid").read_bytes()

    abc = (f"X:1\nT:ok\n%%abc-include {secret}\nI:abc-include {secret}\n%%format {secret}\n%%EPS {secret}\n"
           f"%%abc-charset {secret}\n%%MIDI ptstress {secret}\n%%titlefont {secret} 20\n"
           "%%beginps\n/showpage { } def\n%%endps\n%%beginsvg\n<script>alert(1)</script>\n%%endsvg\n"
           "%%titlefont Times-Bold 20\n%%MIDI program 41\nM:4/4\nL:1/4\nK:C\n"
           f"[I:abc-include {secret}] C D E F|G A B c|]\nw:do re mi fa so la ti do\n")
    rec = render_tune(abc, tmp_path / "out", "t")
    assert rec["ok"], rec
    assert [s.split(":", 1)[0] for s in rec["stripped"]] == ["line 3", "line 4", "line 5", "line 6", "line 7",
                                                            "line 8", "line 9", "line 10", "line 13", "line 21"]
    svg, mid = Path(rec["svg"]).read_text(), Path(rec["midi"]).read_bytes()
    assert "SECRET" not in svg and b"secret" not in mid and "<script" not in svg
    kept = Path(rec["abc"]).read_text()          # the .abc written is what the tools saw
    assert "%%titlefont Times-Bold 20" in kept and "%%MIDI program 41" in kept and str(secret) not in kept
    assert b"\xc0\x29" in mid                    # program change to 41 on channel 1: kept directives still act


def test_each_tool_runs_in_a_fresh_sandbox_dir(tmp_path):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tune.abc").write_text("X:1\n")
        rc, log, killed = abctools.run_sandboxed(["sh", "-c", 'echo "$HOME|$TMPDIR|$(pwd)"; ls -A'], 10, d, 1 << 20)
    assert rc == 0 and killed is None
    home, tmpdir, cwd = log.splitlines()[0].split("|")
    assert home == tmpdir == cwd == os.path.realpath(d) and log.splitlines()[1:] == ["tune.abc"]


def test_caps_on_duration_bytes_and_time(tmp_path):
    t0 = time.time()
    rec = render_tune(LONG, tmp_path, "long", svg=False)
    assert time.time() - t0 < 10 and rec["wav"] is None and not rec["ok"]
    assert rec["errors"] == [("fluidsynth: the music lasts 160.0 min, over the 10 min cap for synthesis: not "
                              "synthesised (raise --max_minutes to allow it)")]
    assert abctools.midi_seconds(rec["midi"]) == pytest.approx(9600, abs=1)
    assert not list(tmp_path.glob("*.wav"))

    with tempfile.TemporaryDirectory() as d:   # a tool writing without end is killed at the byte cap
        rc, _, killed = abctools.run_sandboxed(["sh", "-c", "yes > big"], 30, d, 2_000_000)
        assert rc is None and killed == "output over the 2 MB cap" and (Path(d) / "big").stat().st_size < 50_000_000
    with tempfile.TemporaryDirectory() as d:   # timeout kills the whole process group, grandchildren too
        t0 = time.time()
        rc, _, killed = abctools.run_sandboxed(["sh", "-c", "sleep 60 & echo $! > pid; wait"], 0.5, d, 1 << 20)
        assert killed == "timed out after 0.5 s" and time.time() - t0 < 5
        pid = int((Path(d) / "pid").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_sigterm_of_render_kills_fluidsynth(tmp_path):
    src = tmp_path / "long.abc"
    src.write_text(LONG)
    proc = subprocess.Popen([sys.executable, "-m", "inference.render", str(src), "-o", str(tmp_path / "o"), "--no-svg",
                             "--max_minutes", "200", "--timeout", "120"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    synth = None
    for _ in range(200):                 # wait for its fluidsynth
        time.sleep(0.05)
        kids = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == proc.pid]
        synth = next((k for k in kids if "fluidsynth" in _cmd(k)), None)
        if synth:
            break
    assert synth is not None, "fluidsynth never started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130 and "Traceback" not in proc.stderr.read()
    time.sleep(0.3)
    assert not synth.exists() or (synth / "stat").read_text().split()[2] == "Z"
    assert not list((tmp_path / "o").glob("*.wav"))


def _ppid(p: Path) -> int:
    try:
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmd(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_render_never_overwrites_its_input_and_checks_flags(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    solo = notes / "solo.abc"
    text = "My notes on this tune, keep them!\n\nX:1\nT:Solo\nK:C\nCDEF|]\n"
    solo.write_text(text)
    assert main([str(solo), "-o", str(notes), "--no-wav"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: rendering {solo} into {notes} would overwrite the input ({notes / 'solo.abc'}). Fix: "
                   "choose another -o directory\n")
    assert solo.read_text() == text
    assert main([str(solo), "-o", str(tmp_path / "elsewhere"), "--no-wav", "--no-svg"]) == 0
    for bad in ("nan", "inf", "0", "-3", "x"):
        p = subprocess.run([sys.executable, "-m", "inference.render", str(solo), "-o", str(tmp_path / "x"),
                            "--timeout", bad], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 2 and "--timeout" in p.stderr and "not a number > 0" in p.stderr
        assert "Traceback" not in p.stderr

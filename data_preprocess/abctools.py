"""Thin, safe wrappers around the Debian ABC/audio tools: abc2midi, abcm2ps, fluidsynth (timidity fallback).

Everything here may be fed model output, so: argument lists only (never a shell), a timeout on every
call, inputs written to a private temp dir, and tool diagnostics captured and returned, never raised.
A missing binary raises :class:`ToolMissing` whose message is the apt-get command to run.

This module is the lowest layer (data_preprocess); inference.render and the benchmarks build on it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

APT = {"abc2midi": "abcmidi", "abcm2ps": "abcm2ps", "fluidsynth": "fluidsynth", "timidity": "timidity"}
SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
              "/usr/share/sounds/sf2/FluidR3_GM.sf2")
_DIAG = re.compile(r"^(Error|Warning) in line-char (\d+)-(\d+) : (.*)$")


class ToolMissing(RuntimeError):
    pass


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pkg = APT.get(tool, tool)
        extra = " timgm6mb-soundfont" if tool == "fluidsynth" else ""
        raise ToolMissing(f"'{tool}' is not installed; run: sudo apt-get install -y {pkg}{extra}")
    return path


def soundfont() -> str:
    env = os.environ.get("TUNESMITH_SOUNDFONT")
    for sf in ([env] if env else []) + list(SOUNDFONTS):
        if sf and Path(sf).is_file():
            return sf
    raise ToolMissing("no General MIDI soundfont found; run: sudo apt-get install -y timgm6mb-soundfont "
                      "(or set TUNESMITH_SOUNDFONT=/path/to/font.sf2)")


@dataclass
class ToolResult:
    ok: bool                      # the tool produced its output file
    returncode: int | None        # None on timeout
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str | None = None     # path of the produced file, if any
    log: str = ""                 # the tool's stdout+stderr
    timed_out: bool = False

    @property
    def clean(self) -> bool:
        return self.ok and not self.errors and not self.warnings


def _run(argv: list[str], timeout: float, cwd: str | None = None) -> tuple[int | None, str, bool]:
    try:
        p = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        out = (p.stdout + p.stderr).decode("utf-8", errors="replace")
        return p.returncode, out, False
    except subprocess.TimeoutExpired as e:
        out = ((e.stdout or b"") + (e.stderr or b"")).decode("utf-8", errors="replace")
        return None, out, True


def parse_abc2midi_log(log: str) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    for line in log.splitlines():
        m = _DIAG.match(line.strip())
        if m:
            (errors if m.group(1) == "Error" else warnings).append(f"line {m.group(2)} char {m.group(3)}: {m.group(4)}")
        elif line.lower().startswith("error"):
            errors.append(line.strip())
    return errors, warnings


def abc_to_midi(abc: str, out_midi: str | os.PathLike | None = None, timeout: float = 20.0) -> ToolResult:
    """Runs ``abc2midi`` on one tune. With ``out_midi`` None the MIDI is written to a temp file and
    discarded (a pure validity check)."""
    exe = require("abc2midi")
    with tempfile.TemporaryDirectory(prefix="ts_abc_") as tmp:
        src = Path(tmp) / "tune.abc"
        src.write_text(abc if abc.endswith("\n") else abc + "\n", encoding="utf-8")
        mid = Path(tmp) / "tune.mid"
        rc, log, to = _run([exe, str(src), "-o", str(mid)], timeout, cwd=tmp)
        errors, warnings = parse_abc2midi_log(log)
        ok = mid.is_file() and mid.stat().st_size > 0 and not to
        out = None
        if ok and out_midi is not None:
            Path(out_midi).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mid, out_midi)
            out = str(out_midi)
        if to:
            errors.append(f"abc2midi timed out after {timeout:g} s")
        return ToolResult(ok, rc, errors, warnings, out, log, to)


def midi_to_wav(midi: str | os.PathLike, out_wav: str | os.PathLike, sample_rate: int = 44100,
                timeout: float = 120.0, gain: float = 0.6) -> ToolResult:
    """Synthesises MIDI to WAV with fluidsynth and a GM soundfont (timidity as a fallback)."""
    Path(out_wav).parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("fluidsynth"):
        argv = [shutil.which("fluidsynth"), "-ni", "-q", "-g", str(gain), "-r", str(sample_rate),
                "-F", str(out_wav), "-T", "wav", soundfont(), str(midi)]
    elif shutil.which("timidity"):
        argv = [shutil.which("timidity"), "-c", "/etc/timidity/timgm6mb.cfg", "-Ow", "-s", str(sample_rate),
                "-o", str(out_wav), str(midi)]
    else:
        require("fluidsynth")  # raises with the apt command
    rc, log, to = _run(argv, timeout)
    ok = Path(out_wav).is_file() and Path(out_wav).stat().st_size > 44 and not to
    errors = [] if ok else [f"synthesis failed (rc={rc}): {log.strip()[-300:]}" if not to else "synthesis timed out"]
    return ToolResult(ok, rc, errors, [], str(out_wav) if ok else None, log, to)


def abc_to_svg(abc: str, out_svg: str | os.PathLike, timeout: float = 20.0) -> ToolResult:
    """Engraves the ABC itself (not a MIDI round trip) with ``abcm2ps -g``; first page to ``out_svg``."""
    exe = require("abcm2ps")
    with tempfile.TemporaryDirectory(prefix="ts_ps_") as tmp:
        src = Path(tmp) / "tune.abc"
        src.write_text(abc if abc.endswith("\n") else abc + "\n", encoding="utf-8")
        rc, log, to = _run([exe, "-g", "-q", str(src), "-O", str(Path(tmp) / "out")], timeout, cwd=tmp)
        pages = sorted(Path(tmp).glob("out*.svg"))
        errors = [ln.strip() for ln in log.splitlines() if "error" in ln.lower()]
        warnings = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
        ok = bool(pages) and not to
        if ok:
            Path(out_svg).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pages[0], out_svg)
        if to:
            errors.append(f"abcm2ps timed out after {timeout:g} s")
        return ToolResult(ok, rc, errors, warnings, str(out_svg) if ok else None, log, to)

r"""Thin, safe wrappers around the Debian ABC/audio tools: abc2midi, abcm2ps, fluidsynth (timidity fallback).

Everything here may be fed model output or a stranger's paste, so every tool call is sandboxed:

- argument lists only (never a shell); no format file (abcm2ps ``-F``/``-D``) and no soundfont or config
  from the tune -- the only file arguments are ours;
- a fresh private working dir holding only the tune (or MIDI) file, ``HOME``/``TMPDIR`` pointing into it
  (so ``~/.fluidsynth``, ``default.fmt`` or a relative include find nothing of the user's), a minimal
  environment, its own process group;
- caps on time (``timeout``), on the bytes it may write (the sandbox dir is watched; over the cap the
  process group is killed) and, before synthesis, on the music's duration (:func:`midi_seconds`);
- the process group is killed on timeout, on a cap, and when the caller is interrupted (Ctrl-C, SIGTERM
  turned into KeyboardInterrupt); :func:`kill_running` kills what is still running (the demo on exit);
- directives that make a tool read a file are stripped from the ABC first (:func:`sanitize_abc`).

What :func:`sanitize_abc` strips (``%%name`` lines, ``I:name`` fields and inline ``[I:name ...]``):
``abc-include``/``include`` (abc2midi and abcm2ps open the named file), ``format`` (abcm2ps reads a format
file), ``EPS`` (abcm2ps embeds an EPS file), ``abc-charset`` (a charset table; we always write UTF-8, so it
is never needed), ``%%MIDI ptstress`` (abc2midi reads a stress-model file), PostScript and SVG pass-through
(``beginps``..``endps``, ``postscript``, ``ps``, ``beginsvg``..``endsvg``, ``svg``: code run by abcm2ps'
PostScript interpreter or markup copied into the served SVG), and any font directive (``font``,
``*font``, ``setfont-N``) whose argument looks like a path or URL (``/``, ``\``, ``~``, ``url(``): abcm2ps
takes font names, never needs a file. Everything else is kept -- the other formatting directives
(``%%scale``, ``%%staffwidth``, ``%%titlefont Times-Bold 20``...) and ``%%MIDI program/chord/drum...``:
they change how the tune looks or sounds and reach no file. Each strip is reported (``line N: text``).

A missing binary raises :class:`ToolMissing` whose message is the apt-get command to run.

This module is the lowest layer (data_preprocess); inference.render and the benchmarks build on it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
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
    stripped: list[str] = field(default_factory=list)  # directives removed by sanitize_abc

    @property
    def clean(self) -> bool:
        return self.ok and not self.errors and not self.warnings


_FILE_DIRECTIVES = {"abc-include", "include", "format", "eps", "abc-charset", "postscript", "ps", "svg"}
_BLOCKS = {"beginps": "endps", "beginsvg": "endsvg"}
_PATHLIKE = re.compile(r"[/\\~]|url\(", re.IGNORECASE)
_DIRECTIVE = re.compile(r"^\s*(?:%%|I:)\s*([A-Za-z][\w-]*)(.*)$")
_INLINE_I = re.compile(r"\[\s*I:\s*([A-Za-z][\w-]*)[^\]]*\]")


def _reads_a_file(name: str, args: str) -> bool:
    n = name.lower()
    if n in _FILE_DIRECTIVES or n in _BLOCKS:
        return True
    if n == "midi" and args.split()[:1] and args.split()[0].lower() == "ptstress":
        return True
    return (n == "font" or n.endswith("font") or n.startswith("setfont")) and bool(_PATHLIKE.search(args))


def sanitize_abc(abc: str) -> tuple[str, list[str]]:
    """``abc`` without the directives that reach the file system (see the module docstring); returns the
    clean text and one ``line N: <directive>`` entry per stripped line (a block counts as its first line)."""
    out, stripped, end_block = [], [], None
    for n, line in enumerate(abc.splitlines(), 1):
        m = _DIRECTIVE.match(line)
        if end_block is not None:           # inside %%beginps/%%beginsvg: drop up to the matching end
            if m and m.group(1).lower() == end_block:
                end_block = None
            continue
        if m and _reads_a_file(m.group(1), m.group(2)):
            stripped.append(f"line {n}: {line.strip()[:120]}")
            end_block = _BLOCKS.get(m.group(1).lower())
            continue
        if "[" in line and "I:" in line.upper():
            def drop(mm, n=n):
                if _reads_a_file(mm.group(1), mm.group(0)[:-1].split(mm.group(1), 1)[1]):
                    stripped.append(f"line {n}: {mm.group(0)[:120]}")
                    return ""
                return mm.group(0)
            line = _INLINE_I.sub(drop, line)
        out.append(line)
    return "\n".join(out) + "\n", stripped


_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


def kill_running() -> int:
    """Kills the process group of every tool still running (a server shutting down); returns how many."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        _killpg(p)
    return len(procs)


def _killpg(p: subprocess.Popen):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _dir_bytes(d: str) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


_PRLIMIT = shutil.which("prlimit")


def run_sandboxed(argv: list[str], timeout: float, cwd: str, max_bytes: int,
         kernel_cap: bool = True) -> tuple[int | None, str, str | None]:
    """Runs ``argv`` in the sandbox dir ``cwd`` (``HOME``/``TMPDIR`` point there, own process group); kills the
    group when it runs past ``timeout`` s or writes more than ``max_bytes`` into ``cwd``. Returns
    ``(returncode or None, log, why it was killed or None)``; the log is the last 64 kB of stdout+stderr."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
    if os.environ.get("TUNESMITH_SOUNDFONT"):
        env["TUNESMITH_SOUNDFONT"] = os.environ["TUNESMITH_SOUNDFONT"]
    killed = None
    # The kernel enforces the byte cap per file (RLIMIT_FSIZE via util-linux prlimit, which execs the tool, so it
    # stays the group leader): polling alone let `yes > f` write 69 MB past a 2 MB cap between two looks on a
    # loaded machine. prlimit rather than preexec_fn: the demo server is threaded and preexec_fn is not safe there.
    # (kernel_cap=False for fluidsynth: its WAV writer trips RLIMIT_FSIZE below the cap -- CI, 2026-12-02)
    if _PRLIMIT and kernel_cap:
        argv = [_PRLIMIT, f"--fsize={int(max_bytes)}", "--", *argv]
    with tempfile.TemporaryFile() as logf:
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(p)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    p.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() > deadline:
                    killed = f"timed out after {timeout:g} s"
                elif _dir_bytes(cwd) > max_bytes:
                    killed = f"output over the {max_bytes / 1e6:g} MB cap"
                if killed:
                    _killpg(p)
                    p.wait()
                    break
        except BaseException:       # Ctrl-C / SIGTERM-as-KeyboardInterrupt: never leave the tool running
            _killpg(p)
            p.wait()
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(p)
        if not killed and ((kernel_cap and p.returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ))
                           or _dir_bytes(cwd) > max_bytes):
            killed = f"output over the {max_bytes / 1e6:g} MB cap"
        size = logf.seek(0, os.SEEK_END)
        logf.seek(max(0, size - 65536))
        out = logf.read().decode("utf-8", errors="replace")
    return (None if killed else p.returncode), out, killed


def parse_abc2midi_log(log: str) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    for line in log.splitlines():
        m = _DIAG.match(line.strip())
        if m:
            (errors if m.group(1) == "Error" else warnings).append(f"line {m.group(2)} char {m.group(3)}: {m.group(4)}")
        elif line.lower().startswith("error"):
            errors.append(line.strip())
    return errors, warnings


MAX_MIDI_BYTES = 8 << 20       # abc2midi output cap (a long tune is ~100 kB)
MAX_SVG_BYTES = 32 << 20       # abcm2ps output cap (first page only is kept)
MAX_SECONDS = 600.0            # music longer than this is not synthesised (10 min: 106 MB of 44.1 kHz WAV)
WAV_TAIL_SECONDS = 30.0        # the synthesiser's release tail allowed on top of the music


def _sandbox(prefix: str, name: str, data: bytes) -> tempfile.TemporaryDirectory:
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    (Path(tmp.name) / name).write_bytes(data)
    return tmp


def _abc_bytes(abc: str) -> tuple[bytes, list[str]]:
    clean, stripped = sanitize_abc(abc)
    return clean.encode("utf-8"), stripped


def abc_to_midi(abc: str, out_midi: str | os.PathLike | None = None, timeout: float = 20.0,
                max_bytes: int = MAX_MIDI_BYTES) -> ToolResult:
    """Runs ``abc2midi`` on one tune (sanitised, in a sandbox). With ``out_midi`` None the MIDI is written to
    a temp file and discarded (a pure validity check)."""
    exe = require("abc2midi")
    data, stripped = _abc_bytes(abc)
    with _sandbox("ts_abc_", "tune.abc", data) as tmp:
        mid = Path(tmp) / "tune.mid"
        rc, log, killed = run_sandboxed([exe, "tune.abc", "-o", "tune.mid"], timeout, tmp, max_bytes)
        errors, warnings = parse_abc2midi_log(log)
        ok = mid.is_file() and mid.stat().st_size > 0 and not killed
        out = None
        if ok and out_midi is not None:
            Path(out_midi).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mid, out_midi)
            out = str(out_midi)
        if killed:
            errors.append(f"abc2midi {killed}")
        return ToolResult(ok, rc, errors, warnings, out, log, killed is not None and "timed out" in killed, stripped)


def midi_seconds(path: str | os.PathLike) -> float:
    """How long a Standard MIDI File plays (tempo changes honoured), read from its bytes without playing it;
    ``ValueError`` if it is not a MIDI file."""
    b = Path(path).read_bytes()
    if b[:4] != b"MThd" or len(b) < 14:
        raise ValueError("not a MIDI file")
    _, ntrk, div = struct.unpack(">HHH", b[8:14])
    if div & 0x8000:                                   # SMPTE time: ticks per second directly
        tps = (256 - (div >> 8)) * (div & 0xFF)
        return max(_track_ends(b, ntrk, [])) / float(tps) if ntrk else 0.0
    tempos: list[tuple[int, int]] = []                 # (tick, microseconds per quarter)
    ends = _track_ends(b, ntrk, tempos)
    end = max(ends) if ends else 0
    tempos.sort()
    secs, last_tick, uspq = 0.0, 0, 500000
    for tick, t in tempos:
        if tick >= end:
            break
        secs += (tick - last_tick) * uspq / 1e6 / div
        last_tick, uspq = tick, t
    return secs + (end - last_tick) * uspq / 1e6 / div


def _track_ends(b: bytes, ntrk: int, tempos: list) -> list[int]:
    pos, ends = 8 + struct.unpack(">I", b[4:8])[0], []
    for _ in range(ntrk):
        if b[pos:pos + 4] != b"MTrk":
            raise ValueError("bad MIDI track header")
        n = struct.unpack(">I", b[pos + 4:pos + 8])[0]
        i, stop, tick, status = pos + 8, min(pos + 8 + n, len(b)), 0, 0

        def vlq(stop=stop):
            nonlocal i
            v = 0
            while i < stop:
                c = b[i]
                i += 1
                v = (v << 7) | (c & 0x7F)
                if not c & 0x80:
                    break
            return v
        while i < stop:
            tick += vlq()
            if i >= stop:
                break
            c = b[i]
            if c & 0x80:
                status, i = c, i + 1
            if status == 0xFF:
                kind = b[i] if i < stop else 0
                i += 1
                ln = vlq()
                if kind == 0x51 and ln == 3:
                    tempos.append((tick, int.from_bytes(b[i:i + 3], "big")))
                i += ln
                if kind == 0x2F:
                    break
            elif status in (0xF0, 0xF7):
                i += vlq()
            else:
                i += 1 if (status & 0xF0) in (0xC0, 0xD0) else 2
        ends.append(tick)
        pos += 8 + n
    return ends


def midi_to_wav(midi: str | os.PathLike, out_wav: str | os.PathLike, sample_rate: int = 44100,
                timeout: float = 120.0, gain: float = 0.6, max_seconds: float = MAX_SECONDS) -> ToolResult:
    """Synthesises MIDI to WAV with fluidsynth and a GM soundfont (timidity as a fallback), in a sandbox.
    Music longer than ``max_seconds`` is refused before synthesis (one error line); the WAV may not grow past
    ``max_seconds + WAV_TAIL_SECONDS`` of 16-bit stereo (the process group is killed)."""
    if shutil.which("fluidsynth"):
        argv = [shutil.which("fluidsynth"), "-ni", "-q", "-g", str(gain), "-r", str(sample_rate),
                "-F", "out.wav", "-T", "wav", soundfont(), "in.mid"]
    elif shutil.which("timidity"):
        argv = [shutil.which("timidity"), "-c", "/etc/timidity/timgm6mb.cfg", "-Ow", "-s", str(sample_rate),
                "-o", "out.wav", "in.mid"]
    else:
        require("fluidsynth")  # raises with the apt command
    try:
        secs = midi_seconds(midi)
    except (OSError, ValueError, struct.error, IndexError) as e:
        return ToolResult(False, None, [f"{Path(midi).name}: unreadable MIDI ({e})"])
    if secs > max_seconds:
        why = (f"the music lasts {secs / 60:.1f} min, over the {max_seconds / 60:g} min cap for synthesis: not "
               "synthesised (raise --max_minutes to allow it)")
        return ToolResult(False, None, [why])
    max_bytes = int((max_seconds + WAV_TAIL_SECONDS) * sample_rate * 4) + (1 << 16)
    with _sandbox("ts_wav_", "in.mid", Path(midi).read_bytes()) as tmp:
        rc, log, killed = run_sandboxed(argv, timeout, tmp, max_bytes, kernel_cap=False)
        wav = Path(tmp) / "out.wav"
        ok = wav.is_file() and wav.stat().st_size > 44 and not killed
        if ok:
            Path(out_wav).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(wav, out_wav)
    errors = [] if ok else [f"synthesis {killed}" if killed else f"synthesis failed (rc={rc}): {log.strip()[-300:]}"]
    return ToolResult(ok, rc, errors, [], str(out_wav) if ok else None, log, bool(killed and "timed out" in killed))


def abc_to_svg(abc: str, out_svg: str | os.PathLike, timeout: float = 20.0, max_bytes: int = MAX_SVG_BYTES) -> ToolResult:
    """Engraves the ABC itself (not a MIDI round trip) with ``abcm2ps -g`` (sanitised, in a sandbox, no
    format file); first page to ``out_svg``."""
    exe = require("abcm2ps")
    data, stripped = _abc_bytes(abc)
    with _sandbox("ts_ps_", "tune.abc", data) as tmp:
        rc, log, killed = run_sandboxed([exe, "-g", "-q", "tune.abc", "-O", "out"], timeout, tmp, max_bytes)
        pages = sorted(Path(tmp).glob("out*.svg"))
        errors = [ln.strip() for ln in log.splitlines() if "error" in ln.lower()]
        warnings = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
        ok = bool(pages) and not killed
        if ok:
            Path(out_svg).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pages[0], out_svg)
        if killed:
            errors.append(f"abcm2ps {killed}")
        return ToolResult(ok, rc, errors, warnings, str(out_svg) if ok else None, log,
                          killed is not None and "timed out" in killed, stripped)

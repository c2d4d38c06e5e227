"""Render ABC to something a person can hear and read: MIDI (abc2midi), WAV (fluidsynth + GM soundfont,
timidity fallback) and SVG sheet music engraved straight from the ABC (abcm2ps -g).

Model output is untrusted input: the tools run through :mod:`data_preprocess.abctools`, each in a fresh
sandbox dir holding only the tune file (argument lists, no shell, no format file, capped time / output bytes /
music duration, process group killed on timeout or interrupt). Directives that make a tool read a file are
stripped first (``%%abc-include``/``I:abc-include``, ``%%format``, ``%%EPS``, ``%%abc-charset``,
``%%MIDI ptstress``, PostScript/SVG pass-through, font directives naming a path; the full list is in
:mod:`data_preprocess.abctools`). Kept: every other directive -- ``%%MIDI program/chord/drum/...`` and the
engraving ones (``%%scale``, ``%%titlefont Times-Bold 20``...) -- because they change how the tune sounds or
looks and reach no file. The written ``.abc`` is the sanitised text the tools saw and the record's
``stripped`` lists what was removed (``line N: text``). Every problem -- a syntax error, a tool that
crashed or timed out, a tool that is
not installed (with the apt-get command to fix it) -- lands in the returned record's ``errors`` /
``warnings``; nothing here raises on bad ABC.

    python -m inference.render tune.abc -o out/          # every tune of the file -> out/tune_1.{abc,mid,wav,svg}
    python -m inference.render reply.txt -o out/ --no-wav  # any text: the ABC is extracted first
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import wave
from pathlib import Path

if __package__ in (None, ""):  # `python inference/render.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_preprocess import abctools
from data_preprocess.hub import exit_on_argument_error
from inference.abc_extract import extract_abc

_TMP_ABC = re.compile(r"(?:\S*/ts_(?:ps|abc)_[^/\s]+/)?\btune\.abc\b")   # the tools' sandbox copy


def safe_stem(stem: str) -> str:
    """A file-name-safe stem (tune titles and user input end up in file names)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(stem)).strip("._")
    return s[:80] or "tune"


def wav_duration(path: str | Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / float(w.getframerate())


def render_tune(abc: str, out_dir: str | Path, stem: str = "tune", midi: bool = True, wav: bool = True,
                svg: bool = True, timeout: float = 30.0, max_seconds: float = abctools.MAX_SECONDS) -> dict:
    """Writes ``{stem}.abc`` and, as asked, ``.mid`` / ``.wav`` / ``.svg`` into ``out_dir``.

    Returns a JSON-able record: ``{"stem", "abc", "midi", "wav", "svg", "wav_seconds", "ok", "errors",
    "warnings", "stripped"}`` where a path is None when that output could not be produced. ``ok`` means every
    requested output exists and no tool reported an error (warnings are allowed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = safe_stem(stem)
    rec: dict = {"stem": stem, "abc": None, "midi": None, "wav": None, "svg": None, "wav_seconds": None,
                 "ok": False, "errors": [], "warnings": [], "stripped": []}
    abc = abc if isinstance(abc, str) else ""
    if not abc.strip():
        rec["errors"].append("empty ABC: nothing to render")
        return rec
    abc, rec["stripped"] = abctools.sanitize_abc(abc)
    abc_path = out / f"{stem}.abc"
    abc_path.write_text(abc if abc.endswith("\n") else abc + "\n", encoding="utf-8")
    rec["abc"] = str(abc_path)

    def tidy(msg: str) -> str:  # the tools name their private temp copy; name the file we wrote instead
        return _TMP_ABC.sub(abc_path.name, msg)

    def collect(tool: str, res: abctools.ToolResult) -> str | None:
        rec["errors"] += [f"{tool}: {tidy(e)}" for e in res.errors]
        rec["warnings"] += [f"{tool}: {tidy(w)}" for w in res.warnings]
        if not res.ok and not res.errors:
            rec["errors"].append(f"{tool}: produced no output (rc={res.returncode}): {res.log.strip()[-300:]}")
        return res.output

    if midi or wav:
        try:
            rec["midi"] = collect("abc2midi", abctools.abc_to_midi(abc, out / f"{stem}.mid", timeout=timeout))
        except abctools.ToolMissing as e:
            rec["errors"].append(str(e))
    if wav and rec["midi"]:
        try:
            rec["wav"] = collect("fluidsynth", abctools.midi_to_wav(rec["midi"], out / f"{stem}.wav",
                                                                    timeout=timeout, max_seconds=max_seconds))
            if rec["wav"]:
                rec["wav_seconds"] = round(wav_duration(rec["wav"]), 3)
        except abctools.ToolMissing as e:
            rec["errors"].append(str(e))
        except (wave.Error, EOFError) as e:
            rec["errors"].append(f"fluidsynth wrote an unreadable WAV: {e}")
            rec["wav"] = None
    if svg:
        try:
            rec["svg"] = collect("abcm2ps", abctools.abc_to_svg(abc, out / f"{stem}.svg", timeout=timeout))
        except abctools.ToolMissing as e:
            rec["errors"].append(str(e))
    wanted = [k for k, on in (("midi", midi), ("wav", wav), ("svg", svg)) if on]
    rec["ok"] = all(rec[k] for k in wanted) and not rec["errors"]
    return rec


def render_text(text: str, out_dir: str | Path, stem: str = "reply", **kw) -> dict:
    """Extracts every ABC tune from free text (a model reply) and renders each one.

    Returns ``{"tunes": [record, ...], "note": str | None}``; the note explains an empty result."""
    tunes = extract_abc(text)
    if not tunes:
        return {"tunes": [], "note": "no ABC tune found in the text (need a K: header line and notes)"}
    recs = [render_tune(t, out_dir, f"{stem}_{i + 1}" if len(tunes) > 1 else stem, **kw) for i, t in enumerate(tunes)]
    return {"tunes": recs, "note": None}


def _seconds(v: str) -> float:
    """argparse type: a finite number > 0 (``nan``/``inf``/``0`` would disable the cap)."""
    try:
        x = float(v)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"{v!r} is not a number > 0 (e.g. 30)")
    return x


def _overwrites(src: Path, text: str, out_dir: str, stem: str) -> str | None:
    """The output file (if any) that is the input ``src`` itself (same real path); None if none."""
    n = len(extract_abc(text))
    stems = [safe_stem(stem)] if n <= 1 else [f"{safe_stem(stem)}_{i + 1}" for i in range(n)]
    names = [f"{s}{ext}" for s in stems for ext in (".abc", ".mid", ".wav", ".svg")] + [f"{safe_stem(stem)}.render.json"]
    real = os.path.realpath(src)
    return next((str(Path(out_dir) / nm) for nm in names if os.path.realpath(Path(out_dir) / nm) == real), None)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@exit_on_argument_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render the ABC tunes of a file to MIDI / WAV / SVG.")
    ap.add_argument("input", help="an .abc file, or any text file containing ABC (e.g. a saved model reply); '-' = stdin")
    ap.add_argument("-o", "--output_dir", required=True)
    ap.add_argument("--no-wav", dest="wav", action="store_false", help="skip audio synthesis")
    ap.add_argument("--no-svg", dest="svg", action="store_false", help="skip sheet music")
    ap.add_argument("--timeout", type=_seconds, default=30.0, help="seconds per tool call (synthesis included)")
    ap.add_argument("--max_minutes", type=_seconds, default=abctools.MAX_SECONDS / 60,
                    help="tunes whose music lasts longer are not synthesised to WAV")
    a = ap.parse_args(argv)
    if a.input == "-":
        text, stem = sys.stdin.read(), "stdin"
    else:
        p = Path(a.input)
        if not p.is_file():
            print(f"error: {p}: no such file. Fix: pass an .abc or text file, or '-' for stdin", file=sys.stderr)
            return 2
        text, stem = p.read_text(encoding="utf-8", errors="replace"), p.stem
        clash = _overwrites(p, text, a.output_dir, stem)
        if clash:
            print(f"error: rendering {p} into {a.output_dir} would overwrite the input ({clash}). Fix: choose another "
                  "-o directory", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _interrupt)   # `kill PID` kills the running tool's process group too
    try:
        res = render_text(text, a.output_dir, stem, wav=a.wav, svg=a.svg, timeout=a.timeout,
                          max_seconds=a.max_minutes * 60)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(a.output_dir) / f"{safe_stem(stem)}.render.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    if res["note"]:
        print(res["note"], file=sys.stderr)
        return 1
    return 0 if all(r["ok"] for r in res["tunes"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

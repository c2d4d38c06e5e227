"""The audio CLIs on bad input: one `error: ...` line (no traceback, non-zero exit), nothing half-written; the
model's recorded codec used by the benchmark and found again after a data dir moves; `--decode` codes -> WAV.

Real components only: the tiny random EnCodec, the ABC tokenizer of conftest extended by data_preprocess.audio,
a randomly initialised llama-tiny saved as an HF dir, and the CLIs run as subprocesses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from data_preprocess.audio import AudioPrepConfig, run_audio
from data_preprocess.audio_codec import RANDOM_CODECS, Codec, write_wav

REPO = Path(__file__).resolve().parents[1]
MISSING_CODEC = "/models/encodec_32khz"


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m MODULE ...`` or ``python SCRIPT ...`` (first arg) from ``cwd``, offline, one thread."""
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
         "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, *(["-m"] if not args[0].endswith(".py") else []), *args]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=300, check=False)


def _error_line(p: subprocess.CompletedProcess, rc: int = 2) -> str:
    """The single error line of a failed run (asserting the exit code and that no traceback was printed)."""
    assert p.returncode == rc, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def audio_setup(tmp_path_factory, tokenizer_dir):
    """A project dir with wavs/, data/ (tiny random codec, delay layout) and run/final: a random llama-tiny with
    the audio tokenizer (what training's export holds, minus the training)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from training.presets import preset_config

    root = tmp_path_factory.mktemp("audio_cli")
    t = np.arange(16000) / 16000
    for i in range(3):
        write_wav(root / "wavs" / f"x{i}.wav", 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t), 16000)
    run_audio(AudioPrepConfig(tokenizer=str(tokenizer_dir), output_dir=str(root / "data"), input=str(root / "wavs"),
                              codec="random-tiny", crop_seconds=1.0, caption_dropout=0.0, val_ratio=0.0))
    tok = AutoTokenizer.from_pretrained(root / "data" / "tokenizer")
    cfg = preset_config("llama-tiny", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    final = root / "run" / "final"
    LlamaForCausalLM(cfg).save_pretrained(final)
    tok.save_pretrained(final)
    return root


# ------------------------------------------------------------------------------------- data_preprocess


@pytest.mark.parametrize("src", ["/tmp/no_such_audio_dir_ts", "./no_such_dir", "wavs/missing/deeper", "my_audio/clips",
                                 "wavs/clips"])
def test_preprocess_unreadable_input_is_one_line_and_writes_nothing(tmp_path, tokenizer_dir, src):
    """Missing local paths (and, offline, uncached Hub ids) fail in one line before OUT_DIR is created."""
    (tmp_path / "wavs").mkdir()        # "wavs/clips": its first component exists, so it is a missing local path
    p = _cli(["data_preprocess.audio", "-t", str(tokenizer_dir), "-i", src, "-o", "out", "--codec", "random-tiny"],
             tmp_path)
    line = _error_line(p)
    assert line.startswith(f"error: -i {src}: no such ") and "Fix: -i takes music21" in line
    assert ("not cached" in line) == (src == "my_audio/clips")
    assert not (tmp_path / "out").exists()


def test_preprocess_failure_leaves_no_half_written_dir(tmp_path, tokenizer_dir):
    """A job that fails after writing started (every file unreadable) removes OUT_DIR; the rerun on good input
    needs no --overwrite."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.wav").write_bytes(b"not a wav")
    args = ["data_preprocess.audio", "-t", str(tokenizer_dir), "-o", "out", "--codec", "random-tiny",
            "--crop_seconds", "1"]
    p = _cli([*args, "-i", "bad"], tmp_path)
    assert p.returncode != 0 and "no usable audio" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
    write_wav(tmp_path / "good" / "a.wav", np.zeros(8000, np.float32) + 0.1, 8000)
    p = _cli([*args, "-i", "good", "--val_ratio", "0"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["counts"]["crops"]["train"] == 1
    assert meta["audio"]["codec"]["path"] == str((tmp_path / "out" / "codec").resolve())
    assert (tmp_path / "out" / "codec" / "config.json").is_file()


def test_overwrite_with_bad_arguments_keeps_the_old_output(tmp_path, tokenizer_dir, audio_setup):
    """--overwrite replaces OUT_DIR only once the codec, tokenizer and input are resolved."""
    out = tmp_path / "out"
    shutil.copytree(audio_setup / "data", out)
    before = sorted(q.name for q in out.iterdir())
    base = ["data_preprocess.audio", "-o", str(out), "--overwrite", "--codec", "random-tiny"]
    for args, start in ((["-t", str(tokenizer_dir), "-i", "./no_such_dir"], "error: -i ./no_such_dir: no such file"),
                        (["-t", "./no_such_tok", "-i", "music21"], "error: -t ./no_such_tok: not a tokenizer dir"),
                        (["-t", str(tokenizer_dir), "-i", "music21", "--codec", "./nope"], "error: codec ./nope:")):
        assert _error_line(_cli([*base, *args], tmp_path)).startswith(start)
        assert sorted(q.name for q in out.iterdir()) == before and (out / "meta.json").is_file()


# ------------------------------------------------------------------------------------------ codec path


@pytest.mark.parametrize("cli", ["preprocess", "audio", "inference", "bench"])
def test_missing_codec_dir_is_one_line_in_every_cli(tmp_path, tokenizer_dir, audio_setup, cli):
    model = str(audio_setup / "run" / "final")
    args = {
        "preprocess": ["data_preprocess.preprocess", "--mode", "audio", "-t", str(tokenizer_dir), "-o", "out",
                       "-i", str(audio_setup / "wavs")],
        "audio": ["data_preprocess.audio", "-t", str(tokenizer_dir), "-o", "out", "-i", str(audio_setup / "wavs")],
        "inference": ["inference.audio", "--model", model, "--prompt", "a jig", "--out", "x.wav"],
        "bench": ["benchmarks.audio_speed", "--out", "b.json"],
    }[cli]
    line = _error_line(_cli([*args, "--codec", MISSING_CODEC], tmp_path))
    assert line.startswith(f"error: codec {MISSING_CODEC}: no such directory. Fix: --codec DIR with a local copy "
                           "of facebook/encodec_32khz")
    assert ("--codec random-small" in line) == (cli != "inference")     # only those CLIs build random codecs
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.wav").exists()


# ------------------------------------------------------------------------------------------- benchmark


def test_bench_uses_the_models_codec_and_rejects_a_mismatch(tmp_path, audio_setup, tiny_model_dir):
    model = str(audio_setup / "run" / "final")
    common = ["benchmarks.audio_speed", "--crop_seconds", "1", "--codec_batch", "2", "--repeats", "1",
              "--seconds", "0.4", "--device", "cpu", "--out", "b.json"]
    p = _cli([*common, "--model", model], tmp_path)          # no --codec: the codec recorded in the model
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["codec"]["path"] == str((audio_setup / "data" / "codec").resolve())
    assert [g["layout"] for g in res["generation"]] == ["delay"] and res["generation"][0]["audio_s"] == 0.4

    line = _error_line(_cli([*common, "--model", model, "--codec", "random-small"], tmp_path))
    assert line == (f"error: codec random-small: 4x256 codes at 16000 Hz, but the model {model} was trained on 4x32 "
                    f"at 8000 Hz ({(audio_setup / 'data' / 'codec').resolve()}). Fix: pass the model's codec with "
                    "--codec DIR, or leave --codec out")
    line = _error_line(_cli([*common, "--model", str(tiny_model_dir)], tmp_path))
    assert line.startswith(f"error: model {tiny_model_dir}: a text model, its tokenizer has no audio tokens")


# ------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("entry", ["inference.audio", "inference/predict.py"])
def test_text_model_as_audio_model_is_one_line(tmp_path, tiny_model_dir, entry):
    head = [str(REPO / entry), "--audio"] if entry.endswith(".py") else [entry]
    args = [*head, "--model", str(tiny_model_dir), "--prompt", "a jig", "--out", "x.wav"]
    line = _error_line(_cli(args, tmp_path))
    assert line.startswith(f"error: model {tiny_model_dir}: a text model") and "Fix: pass an audio model" in line
    assert not (tmp_path / "x.wav").exists()


def test_audio_model_in_text_mode_points_to_audio_flag(tmp_path, audio_setup):
    (tmp_path / "p.txt").write_text("a jig in D major\n")
    model = str(audio_setup / "run" / "final")
    p = _cli([str(REPO / "inference" / "predict.py"), "--base_model", model, "--data_file", "p.txt",
              "--predictions_file", "pred.json"], tmp_path)
    line = _error_line(p)
    assert line.startswith(f"error: model {model}: an audio (codec-token) model") and "Fix: add --audio" in line
    assert not (tmp_path / "pred.json").exists()


def test_missing_prompts_file_is_one_line(tmp_path, audio_setup):
    p = _cli(["inference.audio", "--model", str(audio_setup / "run" / "final"), "--prompts_file", "nosuch.txt",
              "--out_dir", "q"], tmp_path)
    assert _error_line(p) == "error: --prompts_file nosuch.txt: no such file (one caption per line expected)"
    assert not (tmp_path / "q").exists()


def test_moved_data_dir_codec_found_again_or_one_line(tmp_path, tokenizer_dir, audio_setup):
    """The tokenizer records the codec's absolute path. Project moved as a whole: the codec is found again
    under the model's ancestors (same trailing path data/codec, geometry checked). Codec really gone: one line
    asking for --codec, and --codec then works."""
    orig = tmp_path / "orig"
    run_audio(AudioPrepConfig(tokenizer=str(tokenizer_dir), output_dir=str(orig / "data"),
                              input=str(audio_setup / "wavs"), codec="random-tiny", crop_seconds=1.0, val_ratio=0.0))
    shutil.copytree(audio_setup / "run", orig / "run")   # same text tokenizer and codec geometry: same vocab
    shutil.copytree(orig / "data" / "tokenizer", orig / "run" / "final", dirs_exist_ok=True)
    proj = tmp_path / "moved"
    orig.rename(proj)
    final = proj / "run" / "final"
    rec = json.loads((final / "tokenizer_config.json").read_text())["tunesmith_audio"]["codec"]
    assert rec["path"] == str((orig / "data" / "codec").resolve()) and not Path(rec["path"]).exists()

    gen = ["inference.audio", "--model", str(final), "--prompt", "a jig", "--seconds", "0.4", "--device", "cpu",
           "--out", "x.wav"]
    p = _cli(gen, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"using {proj / 'data' / 'codec'}" in p.stderr
    with wave.open(str(tmp_path / "x.wav")) as w:
        assert w.getframerate() == 8000 and w.getnframes() == 10 * 320      # 0.4 s = 10 frames at 25 Hz

    shutil.move(proj / "data", tmp_path / "elsewhere")
    line = _error_line(_cli(gen, tmp_path))
    assert line.startswith(f"error: codec {rec['path']}: recorded in the tokenizer of {final} but gone")
    assert "Fix: pass --codec DIR" in line
    p = _cli([*gen, "--codec", str(tmp_path / "elsewhere" / "codec")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]


def test_decode_saved_codes_to_wav(tmp_path, audio_setup):
    """`--decode codes.npy --codec DIR` writes the WAV the codec decodes those codes to; --model finds the codec
    itself; codes that do not fit the codec are one line."""
    codec_dir = audio_setup / "data" / "codec"
    codec = Codec(codec_dir)
    t = np.arange(8000) / 8000
    codes = codec.encode([codec.prepare((0.3 * np.sin(2 * np.pi * 330 * t))[None].astype(np.float32), 8000)])[0]
    np.save(tmp_path / "c.npy", codes)
    assert codes.shape == (4, 25)

    p = _cli(["inference.audio", "--decode", "c.npy", "--codec", str(codec_dir)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    with wave.open(str(tmp_path / "c.wav")) as w:           # default: next to the .npy
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 25 * 320)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    ref = np.clip(codec.decode(codes)[0, 0], -1, 1) * 32767
    assert np.abs(pcm - ref).max() <= 1.0 and np.abs(pcm).max() > 0

    p = _cli(["inference.audio", "--decode", "c.npy", "--model", str(audio_setup / "run" / "final"), "--out",
              "sub/y.wav"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "sub" / "y.wav").read_bytes() == (tmp_path / "c.wav").read_bytes()

    np.save(tmp_path / "bad.npy", codes[:2])
    line = _error_line(_cli(["inference.audio", "--decode", "bad.npy", "--codec", str(codec_dir)], tmp_path))
    assert line.startswith("error: --decode bad.npy: codes [2, 25]") and "4 codebooks x 32" in line


def test_random_codec_cli_name_errors(tmp_path, tokenizer_dir):
    line = _error_line(_cli(["data_preprocess.audio", "-t", str(tokenizer_dir), "-o", "out", "-i", "music21",
                             "--codec", "random-huge"], tmp_path))
    names = ", ".join(f"random-{g}" for g in RANDOM_CODECS)
    assert line == f"error: codec random-huge: unknown random codec; choose one of {names} or a codec dir"
    assert not (tmp_path / "out").exists()

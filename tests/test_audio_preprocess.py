"""Audio preprocessing: ABC rendering, the (tiny, random) codec, and audio -> shards + extended tokenizer."""
from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest

from data_preprocess.audio import (
    AudioPrepConfig,
    maybe_run_from_preprocess,
    render_abc,
    run_audio,
)
from data_preprocess.audio_codec import Codec, make_random_codec, read_audio, write_wav
from data_preprocess.audio_layout import AudioVocab, make_layout
from data_preprocess.sft import describe_key
from data_preprocess.shards import open_split, read_meta

SCALE = "X:1\nT:Scale\nM:4/4\nL:1/4\nQ:1/4=120\nK:C\nCDEF|GABc|\n"   # 8 beats at 120 bpm = 4.0 s


@pytest.fixture(scope="module")
def tiny_codec(tmp_path_factory):
    return make_random_codec(tmp_path_factory.mktemp("codec"), "tiny")


def test_abc_to_wav_non_silent_with_expected_duration(tmp_path):
    audio, sr = render_abc(SCALE, 16000, tmp_path)
    dur = audio.shape[1] / sr
    assert sr == 16000 and 4.0 <= dur <= 4.0 + 1.0, dur          # the music + a short release tail
    rms = [float(np.sqrt(np.mean(audio[:, int(t * sr):int((t + 0.5) * sr)] ** 2))) for t in np.arange(0, 4, 0.5)]
    assert min(rms) > 1e-3, rms                                  # every half second of the 8 notes sounds
    with pytest.raises(ValueError, match="abc2midi"):
        render_abc("this is not ABC", 16000, tmp_path)


def test_wav_io_resample_downmix(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32) * 0.5
    write_wav(tmp_path / "s.wav", stereo, 44100)
    x, sr = read_audio(tmp_path / "s.wav")
    assert sr == 44100 and x.shape == (2, 44100) and np.abs(x - stereo).max() < 1e-3
    x2, _ = read_audio((tmp_path / "s.wav").read_bytes())       # the datasets path: WAV bytes
    assert np.array_equal(x, x2)
    (tmp_path / "bad.wav").write_bytes(b"RIFFnonsense")
    with pytest.raises(ValueError, match="bad.wav"):
        read_audio(tmp_path / "bad.wav")


def test_random_codec_encode_decode_shapes(tiny_codec, caplog):
    with caplog.at_level(logging.WARNING, logger="tunesmith.audio"):
        codec = Codec(tiny_codec)
    assert "meaningless" in caplog.text and codec.info.random_init
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (8000, 25.0, 4, 32)
    rng = np.random.default_rng(0)
    clip = codec.prepare(rng.standard_normal((2, 11025)).astype(np.float32) * 0.2, 11025)   # stereo 11.025 kHz
    assert clip.shape == (1, 8000)
    clips = [clip, clip[:, :8000 - 1234]]
    codes = codec.encode(clips)
    assert [c.shape for c in codes] == [(4, 25), (4, int(np.ceil((8000 - 1234) / 320)))]
    assert all(c.dtype == np.int64 and c.min() >= 0 and c.max() < 32 for c in codes)
    assert len(np.unique(codes[0])) > 4                        # codebooks are initialised: codes vary
    audio = codec.decode(codes[0])
    assert audio.shape == (1, 1, 25 * 320) and np.isfinite(audio).all()


def _folder_corpus(root):
    """3 recordings (stereo 22.05 kHz tones, 2.7 s / 1.2 s / 0.4 s), captions for two, one corrupt file."""
    root.mkdir()
    sr = 22050
    for name, secs, cap in (("a", 2.7, "a slow air on flute"), ("b", 1.2, "a reel"), ("c", 0.4, None)):
        t = np.arange(int(secs * sr)) / sr
        x = np.stack([np.sin(2 * np.pi * 330 * t), np.sin(2 * np.pi * 495 * t)]) * 0.3
        write_wav(root / f"{name}.wav", x, sr)
        if cap:
            (root / f"{name}.txt").write_text(cap + "\n")
    (root / "broken.wav").write_bytes(b"not a wav at all")
    return root


@pytest.mark.parametrize("layout", ["delay", "flatten"])
def test_folder_to_shards_end_to_end(tmp_path, tokenizer_dir, tiny_codec, layout):
    from transformers import AutoTokenizer

    src = _folder_corpus(tmp_path / "audio")
    cfg = AudioPrepConfig(tokenizer=str(tokenizer_dir), output_dir=str(tmp_path / "out"), input=str(src),
                          codec=str(tiny_codec), layout=layout, crop_seconds=1.0, min_crop_seconds=0.5,
                          caption_dropout=0.0, val_ratio=0.4, seed=1, workers=2)
    meta = run_audio(cfg)
    assert meta == read_meta(tmp_path / "out")
    c = meta["counts"]
    # a: 2 crops + 0.7 s tail, b: 1 crop + 0.2 s dropped, c: 0.4 s < min -> dropped; broken.wav skipped by name
    assert sum(c["crops"].values()) == 4 and c["num_skipped"] == 1 and "broken.wav" in c["skipped"][0]
    assert c["dropped_seconds"] == pytest.approx(0.2 + 0.4, abs=0.01)
    a = meta["audio"]
    assert meta["mode"] == "audio" and a["layout"] == layout and a["codec"]["num_codebooks"] == 4
    assert a["codec"]["random_init"] and a["codec"]["frame_rate"] == 25.0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert len(tok) == meta["vocab_size"] and tok.init_kwargs["tunesmith_audio"] == json.loads(json.dumps(a))
    vocab = AudioVocab.from_dict(a["vocab"])
    lay = make_layout(layout, vocab)
    n_docs, captions, frames = 0, [], []
    for split in ("train", "val"):
        s = open_split(tmp_path / "out", split, meta)
        for b in range(len(s)):
            ids, mask, pos = np.asarray(s.tokens[b]), np.asarray(s.loss_mask[b]), np.asarray(s.pos[b])
            starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
            for st, en in itertools.pairwise(starts):
                doc = ids[st:en]
                if doc[0] != tok.bos_token_id:
                    assert (doc == tok.pad_token_id).all() and mask[st:en].sum() == 0   # block-tail filler
                    continue
                n_docs += 1
                boa = int(np.flatnonzero(doc == vocab.boa_id)[0])
                captions.append(tok.decode(doc[1:boa]))
                codes = lay.decode(lay.body_of(doc))                 # exact inverse of what was written
                frames.append(codes.shape[1])
                assert (mask[st:en] == 1).sum() == codes.size + 1 + (layout == "delay")
                end = int(np.flatnonzero(doc == tok.eos_token_id)[-1])
                assert (doc[end + 1:] == tok.pad_token_id).all()        # only the split's last block is padded
                assert (doc[:boa + 1] < vocab.text_vocab_size + 3).all()
    assert n_docs == 4 and sorted(frames) == [18, 25, 25, 25]     # 0.7 s tail = ceil(0.7 * 25) frames
    assert captions.count("a slow air on flute") == 3 and captions.count("a reel") == 1
    # whole recordings go to one split
    assert c["crops"]["val"] in (1, 3)


def test_music21_default_via_preprocess_dispatch(tmp_path, tokenizer_dir, tiny_codec):
    """`preprocess --mode audio` with the embedded corpus: ABC rendered to audio, captions from metadata."""
    out = tmp_path / "m21"
    rc = maybe_run_from_preprocess(["--mode", "audio", "-t", str(tokenizer_dir), "-o", str(out), "-i", "music21",
                                    "--codec", str(tiny_codec), "--limit", "4", "--crop_seconds", "2",
                                    "--max_crops_per_file", "1", "--layout", "flatten", "caption_dropout=0.5"])
    assert rc == 0
    assert maybe_run_from_preprocess(["--mode", "pt", "-o", "x"]) is None
    meta = read_meta(out)
    assert meta["counts"]["source_kind"] == "abc" and sum(meta["counts"]["crops"].values()) >= 3
    assert meta["audio"]["caption_dropout"] == 0.5 and meta["audio"]["tokens_per_second"] == 100.0
    assert meta["max_len"] % 64 == 0 and meta["max_len"] >= 1 + 64 + 1 + 50 * 4 + 2
    s = open_split(out, "train", meta)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = tok.decode(np.asarray(s.tokens).reshape(-1), skip_special_tokens=True)
    assert "played on" in text and " in " in text               # "<rhythm> in <key>, <meter> time, played on ..."


def test_key_names_and_bad_config(tmp_path, capsys):
    # captions name the key as SFT instructions do (data_preprocess.sft.describe_key: one mode table)
    assert [describe_key(k) or "" for k in ("D", "Em", "Ador", "F#m", "Bbmix", "G major", "HP")] == [
        "D major", "E minor", "A dorian", "F sharp minor", "B flat mixolydian", "G major", ""]
    from data_preprocess.audio import main

    with pytest.raises(SystemExit) as e:
        main(["-t", "x", "-o", str(tmp_path), "crop_secs=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown config key 'crop_secs'. Fix: use one of ['crop_seconds'" in err, err


def test_datasets_input(tmp_path, tokenizer_dir, tiny_codec):
    """A `datasets` audio dataset (save_to_disk dir) is read undecoded: WAV bytes, caption column."""
    import datasets

    paths = []
    for i, secs in enumerate((1.0, 2.0)):
        t = np.arange(int(secs * 16000)) / 16000
        paths.append(write_wav(tmp_path / f"x{i}.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000))
    ds = datasets.Dataset.from_dict({"audio": paths, "caption": ["a waltz", "a march"]})
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "ds"))
    meta = run_audio(AudioPrepConfig(tokenizer=str(tokenizer_dir), output_dir=str(tmp_path / "out"),
                                     input=str(tmp_path / "ds"), codec=str(tiny_codec), crop_seconds=1.0,
                                     caption_dropout=0.0, val_ratio=0.0))
    c = meta["counts"]
    assert c["source_kind"] == "datasets" and c["crops"] == {"train": 3, "val": 0} and c["num_skipped"] == 0
    assert c["seconds"]["train"] == pytest.approx(3.0)

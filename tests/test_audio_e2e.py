"""The audio branch end to end on CPU: embedded ABC corpus -> rendered audio -> tiny random codec -> delay
tokens -> 20 DeepSpeed steps of llama-tiny (mode audio) -> exact resume -> generate -> WAV of the asked length."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_preprocess.audio import AudioPrepConfig, run_audio
from data_preprocess.audio_codec import make_random_codec, read_audio
from tests.test_train_fixtures import losses, run_train


@pytest.mark.slow
def test_audio_preprocess_train_resume_generate(tmp_path, tokenizer_dir):
    codec = make_random_codec(tmp_path / "codec", "tiny")
    data = tmp_path / "data"
    meta = run_audio(AudioPrepConfig(tokenizer=str(tokenizer_dir), output_dir=str(data), input="music21",
                                     codec=str(codec), layout="delay", crop_seconds=1.0, max_crops_per_file=3,
                                     limit=6, val_ratio=0.2, caption_dropout=0.25, seed=0))
    assert meta["mode"] == "audio" and meta["splits"]["train"]["num_blocks"] >= 4

    common = ["mode=audio", f"data_dir={data}", "model=llama-tiny", "max_steps=20", "global_batch_size=4",
              "micro_batch_size=2", "lr=3e-3", "log_every=1", "ds_config=ds_configs/zero0.json", "report_to=none",
              "doc_attention=block", "save_every=10", "seed=3"]
    run_train([*common, f"output_dir={tmp_path / 'run'}"])
    full = losses(tmp_path / "run")
    assert sorted(full) == list(range(1, 21))
    assert np.mean([full[s] for s in range(16, 21)]) < full[1] - 0.5     # it learns the code distribution
    # resume from step 10 in a fresh dir: steps 11..20 repeat the uninterrupted run
    run_train([*common, f"output_dir={tmp_path / 'resumed'}",
               f"resume={tmp_path / 'run' / 'checkpoints' / 'step-00000010'}"])
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(11, 21))
    assert all(abs(resumed[s] - full[s]) < 1e-4 for s in resumed), (resumed, full)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # token-by-token decoding of a tiny model: extra threads only spin on a shared CPU
    try:
        _generate(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _generate(tmp_path):
    from inference.audio import AudioGenConfig, run

    final = tmp_path / "run" / "final"
    rec = run(AudioGenConfig(model=str(final), prompt="a jig in D major", out=str(tmp_path / "gen" / "x.wav"),
                             seconds=1.2, device="cpu", seed=0))[0]
    audio, sr = read_audio(rec["wav"])
    assert sr == 8000 and audio.shape == (1, 30 * 320)                  # 1.2 s = 30 frames at 25 Hz
    assert np.load(tmp_path / "gen" / "x.npy").shape == (4, 30)
    assert rec["cfg_scale"] == 3.0 and rec["random_codec"]            # CFG on: captions were dropped in training
    assert json.loads((tmp_path / "gen" / "x.json").read_text())["results"][0]["num_frames"] == 30
    # batch form, codes only, model-decided length within [min_seconds, seconds]
    (tmp_path / "prompts.txt").write_text("reel in G major\n\nhornpipe in A dorian, played on flute\n")
    recs = run(AudioGenConfig(model=str(final), prompts_file=str(tmp_path / "prompts.txt"),
                              out_dir=str(tmp_path / "batch"), seconds=0.8, min_seconds=0.2, codes_only=True,
                              cfg_scale=1.0, device="cpu"))
    assert len(recs) == 2 and all("wav" not in r for r in recs)
    for i in range(2):
        c = np.load(tmp_path / "batch" / f"{i:03d}.npy")
        assert c.shape[0] == 4 and 5 <= c.shape[1] <= 20 and c.max() < 32

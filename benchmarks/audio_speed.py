"""Speed figures of the audio-codec branch: codec throughput, token rate per layout, generation real-time factor.

    python -m benchmarks.audio_speed                                  # tiny random codec + llama-tiny, CPU
    python -m benchmarks.audio_speed --model outputs/audio/run/final --device cuda    # the model's recorded codec
    python -m benchmarks.audio_speed --codec /models/encodec_32khz --device cuda      # a codec + random model

Prints a table and writes JSON (``--out``). What is measured:

* codec encode / decode throughput: seconds of audio processed per wall second (batched crops of
  ``--crop_seconds``; the first forward is a discarded warm-up).
* tokens per second of audio for each layout: counted from real layout encodings of one crop (``<boa>``,
  ``<eoa>`` and the delay pattern's ``K-1`` fill steps included; caption excluded) for this codec and for the
  published geometries of common codecs (EnCodec 32 kHz as MusicGen uses it, EnCodec 24 kHz, DAC 44 kHz).
* generation real-time factor (RTF): wall seconds to generate (and, separately, to decode) ``--seconds`` of
  audio per prompt, divided by the audio seconds produced. RTF < 1 is faster than real time. Without
  ``--model``, a random ``--preset`` LLaMA with a freshly extended tokenizer is timed (the speed is real,
  the music is not).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_preprocess.audio_codec import (
    Codec,
    check_codec_dir,
    make_random_codec,
    random_codec_geometry,
)
from data_preprocess.audio_layout import LAYOUTS, AudioVocab, extend_tokenizer, make_layout
from data_preprocess.hub import exit_on_argument_error
from data_preprocess.train_tokenizer import train_tokenizer
from inference.audio import audio_spec, check_codec, codec_dir_of, generate_codes
from inference.loading import auto_device, load_model
from training.presets import preset_config

log = logging.getLogger("tunesmith.bench")

# frame rate, codebooks, codebook size of published codecs (the token-rate table needs only these)
REFERENCE_CODECS = {
    "encodec_32khz (MusicGen, 2.2 kbps)": (50.0, 4, 2048),
    "encodec_24khz @ 1.5 kbps": (75.0, 2, 1024),
    "encodec_24khz @ 6 kbps": (75.0, 8, 1024),
    "dac_44khz (9 codebooks)": (86.1328125, 9, 1024),
}


def tokens_per_second(frame_rate: float, K: int, N: int, crop_seconds: float) -> dict:
    """Audio tokens per second of audio for every layout, counted on an actual encoding of one crop."""
    v = AudioVocab(100, K, N, 100, 101, 102, tuple(103 + k * N for k in range(K)))
    T = int(np.ceil(crop_seconds * frame_rate))
    codes = np.zeros((K, T), dtype=np.int64)
    out = {}
    for name in LAYOUTS:
        ids, _ = make_layout(name, v).document([], codes, 1, 2)
        n_audio = len(ids) - 2                     # minus <s> </s>; <boa> body <eoa> remain
        out[name] = n_audio / (T / frame_rate)
    return out


def bench_codec(codec: Codec, crop_seconds: float, batch: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    n = int(crop_seconds * codec.sample_rate)
    t = np.arange(n) / codec.sample_rate
    # tones + noise: content does not change a convolutional codec's cost, only the length does
    clips = [(0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)[None]
             for i in range(batch)]
    codec.encode(clips[:1])                       # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        codes = codec.encode(clips)
    enc = time.perf_counter() - t0
    codec.decode(codes[0][None])
    t0 = time.perf_counter()
    for _ in range(repeats):
        codec.decode(np.stack(codes))
    dec = time.perf_counter() - t0
    audio_s = repeats * batch * crop_seconds
    return {"crop_seconds": crop_seconds, "batch": batch, "repeats": repeats,
            "encode_audio_s_per_s": audio_s / enc, "decode_audio_s_per_s": audio_s / dec}


def _random_model(preset: str, codec: Codec, device: torch.device, workdir: Path):
    """A random ``preset`` LLaMA over a 400-piece text tokenizer extended with this codec's tokens."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    def abc_texts(n=20):
        from music21 import corpus

        return [Path(p).read_text(encoding="utf-8", errors="replace")
                for p in sorted(corpus.getPaths(fileExtensions=("abc",)))[:n]]

    train_tokenizer(abc_texts(), workdir / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(workdir / "tok")
    v = extend_tokenizer(tok, codec.num_codebooks, codec.codebook_size)
    tok.init_kwargs["tunesmith_audio"] = {"codec": codec.info.to_dict(), "layout": "delay", "vocab": v.to_dict(),
                                          "caption_dropout": 0.0, "max_caption_tokens": 64}
    cfg = preset_config(preset, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).eval(), tok


def bench_generation(model, tok, codec: Codec, layout: str, seconds: float, batch: int, cfg_scale: float) -> dict:
    spec = tok.init_kwargs["tunesmith_audio"]
    spec["layout"] = layout
    prompts = ["jig in D major, 6/8 time, played on violin"] * batch
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    generate_codes(model, tok, prompts[:1], min(seconds, 0.2), generator=g)     # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    codes = generate_codes(model, tok, prompts, seconds, cfg_scale=cfg_scale, generator=g)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    codec.decode(np.stack(codes))
    dec = time.perf_counter() - t0
    audio_s = sum(c.shape[1] for c in codes) / codec.frame_rate
    n_tok = batch * make_layout(layout, AudioVocab.from_dict(spec["vocab"])).num_tokens(codes[0].shape[1])
    return {"layout": layout, "seconds_per_prompt": seconds, "batch": batch, "cfg_scale": cfg_scale,
            "generate_s": gen, "decode_s": dec, "audio_s": audio_s, "tokens": n_tok,
            "tokens_per_s": n_tok / gen, "rtf_generate": gen / audio_s, "rtf_total": (gen + dec) / audio_s,
            "rtf_per_stream": gen / (audio_s / batch)}


@exit_on_argument_error
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default="", help="codec dir, or random-tiny / random-small / random-encodec_32khz "
                    "(the real codec's size, random weights); default: --model's recorded codec, else random-tiny")
    ap.add_argument("--model", default="", help="trained audio model dir (--codec must match its recorded codec)")
    ap.add_argument("--preset", default="llama-tiny", help="random model to time when --model is not given")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--crop_seconds", type=float, default=10.0)
    ap.add_argument("--codec_batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="audio generated per prompt")
    ap.add_argument("--gen_batch", type=int, default=1)
    ap.add_argument("--cfg_scale", type=float, default=1.0, help="> 1 doubles the batch (guided + caption-less rows)")
    ap.add_argument("--out", default="outputs/bench/audio_speed.json")
    a = ap.parse_args(argv)

    return _run(a, auto_device(a.device))


def _run(a: argparse.Namespace, device: torch.device) -> int:
    loaded = spec = None
    if a.model:   # first: the model decides the codec (a codec it was not trained on fails in EnCodec's decode)
        loaded = load_model(a.model, device=str(device))
        spec = audio_spec(loaded.tokenizer, a.model)
    with tempfile.TemporaryDirectory(prefix="ts_bench_audio_") as tmp:
        codec_name = a.codec or (codec_dir_of(spec, a.model) if spec else "random-tiny")
        geometry = random_codec_geometry(codec_name)
        codec_dir = make_random_codec(Path(tmp) / "codec", geometry) if geometry else check_codec_dir(codec_name, True)
        codec = Codec(codec_dir, device=str(device))
        if geometry:
            codec.path = codec_name      # name it as given, not by its temporary dir
        if spec:
            check_codec(codec, spec, a.model)
        info = codec.info
        res = {"device": str(device), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "codec": info.to_dict()}
        res["codec_speed"] = bench_codec(codec, a.crop_seconds, a.codec_batch, a.repeats)
        res["tokens_per_second_of_audio"] = {
            "this codec": tokens_per_second(info.frame_rate, info.num_codebooks, info.codebook_size, a.crop_seconds),
            **{name: tokens_per_second(*g, a.crop_seconds) for name, g in REFERENCE_CODECS.items()}}
        if loaded is not None:
            model, tok = loaded.model, loaded.tokenizer
            res["model"] = a.model
        else:
            model, tok = _random_model(a.preset, codec, device, Path(tmp))
            res["model"] = f"{a.preset} (random init)"
        layouts = [spec["layout"]] if spec else list(LAYOUTS)
        res["generation"] = [bench_generation(model, tok, codec, lay, a.seconds, a.gen_batch, a.cfg_scale)
                             for lay in layouts]

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    cs = res["codec_speed"]
    print(f"\ncodec {info.path} ({info.sample_rate} Hz, {info.frame_rate:g} frames/s, {info.num_codebooks} x "
          f"{info.codebook_size}{', RANDOM' if info.random_init else ''}) on {device}")
    print(f"  encode {cs['encode_audio_s_per_s']:.1f} s of audio / s, decode {cs['decode_audio_s_per_s']:.1f} s/s "
          f"(batch {cs['batch']} x {cs['crop_seconds']:g} s)")
    print(f"\ntokens per second of audio ({a.crop_seconds:g} s crops, <boa>/<eoa> included):")
    print(f"  {'codec':38s}" + "".join(f"{n:>10s}" for n in LAYOUTS))
    for name, r in res["tokens_per_second_of_audio"].items():
        print(f"  {name:38s}" + "".join(f"{r[n]:10.1f}" for n in LAYOUTS))
    print(f"\ngeneration with {res['model']} ({a.gen_batch} x {a.seconds:g} s, cfg {a.cfg_scale:g}):")
    for g in res["generation"]:
        print(f"  {g['layout']:8s} {g['tokens_per_s']:8.1f} tok/s   RTF generate {g['rtf_generate']:.2f}   "
              f"RTF incl. decode {g['rtf_total']:.2f}   per-stream RTF {g['rtf_per_stream']:.2f}")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Text-to-audio generation with a LLaMA trained on codec tokens: caption -> codes -> codec -> WAV.

    python -m inference.audio --model OUT/final --prompt "jig in D major" --out x.wav [--seconds 5]
    python -m inference.audio --model OUT/final --prompts_file prompts.txt --out_dir wavs/    # batch form
    python inference/predict.py --audio --prompt "a jig in D major" --out x.wav              # same flags

The model's tokenizer carries the audio spec written by ``data_preprocess.audio`` (codec identity, layout,
token ids; key ``tunesmith_audio`` in tokenizer_config.json), so a checkpoint knows how to decode itself;
``--codec`` overrides the codec directory (e.g. after moving it).

Sampling is restricted at every step to the tokens the layout allows there
(:class:`data_preprocess.audio_layout.LayoutConstraint`), so every output decodes. With ``--cfg_scale`` > 1
and a model trained with caption dropout, classifier-free guidance mixes the captioned and the
caption-less (``<s> <boa>``) predictions: ``uncond + scale * (cond - uncond)`` (MusicGen).
Outputs: the WAV, the codes (``.npy``, ``[K, T]`` int64; ``--codes_only`` skips decoding) and a JSON record
with timing (real-time factor = generation seconds / audio seconds). Codes saved earlier are decoded with

    python -m inference.audio --decode x.npy --codec CODEC_DIR [--out x.wav]      # or --model OUT/final

The codec is ``--codec``, else the path recorded in the tokenizer; when that path has moved (a data dir
copied elsewhere), the same trailing path (e.g. ``data/codec``) is looked up next to the model and the current
directory, and a found codec must have the recorded geometry.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data_preprocess.audio_codec import Codec, write_wav
from data_preprocess.audio_layout import AudioVocab, LayoutConstraint, make_layout
from data_preprocess.config import document, from_namespace
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from inference.loading import auto_device, load_model
from training.hf_io import ModelPathError, load_tokenizer, resolve_model_path

log = logging.getLogger("tunesmith.audio")


@dataclass
class AudioGenConfig:
    """One generation job (flags, ``--config`` YAML/JSON and ``key=value`` use these names)."""

    model: str = ""
    """HF model dir (a checkpoint's hf/ or final/)"""
    lora: str = ""
    """optional PEFT adapter dir on top of ``model``"""
    tokenizer: str = ""
    """default: the adapter's, else the model's"""
    codec: str = ""
    """default: the codec path recorded in the tokenizer's audio spec"""
    prompt: str = ""
    """a caption to generate audio for (single form)"""
    prompts_file: str = ""
    """batch form: one caption per line"""
    out: str = "generated.wav"
    """single prompt: the WAV path (codes next to it as .npy)"""
    out_dir: str = "generated_audio"
    """batch form: NNN.wav / NNN.npy + results.json"""
    seconds: float = 5.0
    """audio length to generate"""
    min_seconds: float | None = None
    """None = ``seconds`` (exact length); lower lets the model stop earlier"""
    temperature: float = 1.0
    """sampling temperature"""
    top_k: int = 250
    """MusicGen's default; 0 = off"""
    top_p: float = 0.0
    """0 = off"""
    cfg_scale: float | None = None
    """None = 3.0 when the data had caption dropout, else 1.0 (off)"""
    batch_size: int = 4
    """captions per generate() call (batch form)"""
    seed: int = 0
    """sampling seed"""
    codes_only: bool = False
    """save the codec codes (.npy) without decoding them to WAV"""
    decode: str = ""
    """decode only: a saved codes .npy ([K, T]) -> WAV at ``out`` (no generation)"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto | fp32 | bf16 | fp16"""


def audio_spec(tokenizer, model: str = "") -> dict:
    """The audio spec that ``data_preprocess.audio`` stored in the tokenizer; a one-line
    :class:`ModelPathError` naming ``model`` (the dir it came from) if absent, e.g. for a text (ABC) model."""
    spec = getattr(tokenizer, "init_kwargs", {}).get("tunesmith_audio")
    if not spec:
        raise ModelPathError(f"model {model or getattr(tokenizer, 'name_or_path', '?')}: a text model, its tokenizer "
                             "has no audio tokens/spec (tokenizer_config.json key 'tunesmith_audio'). Fix: pass an "
                             "audio model (OUTPUT_DIR/final of training with mode=audio on data_preprocess.audio "
                             "shards); text models go to inference/predict.py without --audio")
    return spec


def check_codec(codec: Codec, spec: dict, model: str = "") -> Codec:
    """The codec must have the codebooks the model was trained on; else a one-line :class:`ModelPathError`."""
    want = (int(spec["vocab"]["num_codebooks"]), int(spec["vocab"]["codebook_size"]),
            int(spec["codec"].get("sample_rate", codec.sample_rate)))
    if (codec.num_codebooks, codec.codebook_size, codec.sample_rate) != want:
        raise ModelPathError(f"codec {codec.path}: {codec.num_codebooks}x{codec.codebook_size} codes at "
                             f"{codec.sample_rate} Hz, but the model {model} was trained on {want[0]}x{want[1]} at "
                             f"{want[2]} Hz ({spec['codec'].get('path')}). Fix: pass the model's codec with "
                             "--codec DIR, or leave --codec out")
    return codec


def codec_dir_of(spec: dict, model: str = "") -> str:
    """The codec dir recorded in the audio spec. If it no longer exists (the data dir moved), its trailing
    components (``data/codec``, ``codec``) are looked up under the model dir's ancestors and the current dir;
    a candidate is used only when its sample rate and codebooks match the record. Otherwise a one-line
    :class:`ModelPathError` asking for ``--codec DIR``."""
    rec = spec["codec"]
    path = Path(rec["path"])
    if (path / "config.json").is_file():
        return str(path)
    roots = [*Path(model).resolve().parents, Path.cwd()] if model else [Path.cwd()]
    for n in range(len(path.parts) - 1, 0, -1):           # longest tail first: data/codec before codec
        tail = Path(*path.parts[-n:])
        for root in roots:
            cand = root / tail
            if (cand / "config.json").is_file() and _same_geometry(cand, rec):
                log.warning("codec %s recorded in the tokenizer is gone; using %s (pass --codec to choose)", path, cand)
                return str(cand)
    raise ModelPathError(f"codec {path}: recorded in the tokenizer of {model or 'the model'} but gone (the data dir "
                         "moved?). Fix: pass --codec DIR (the codec the data was encoded with, e.g. DATA_DIR/codec "
                         "for random-* codecs, or your copy of facebook/encodec_32khz)")


def _same_geometry(path: Path, rec: dict) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (cfg.get("sampling_rate") == rec.get("sample_rate") and cfg.get("codebook_size") == rec.get("codebook_size")
            and float(rec.get("bandwidth", -1)) in [float(b) for b in cfg.get("target_bandwidths") or []])


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p and 0.0 < top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(srt, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(srt, dim=-1) > top_p      # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


@torch.inference_mode()
def generate_codes(model, tokenizer, prompts: list[str], seconds: float, min_seconds: float | None = None,
                   temperature: float = 1.0, top_k: int = 250, top_p: float = 0.0, cfg_scale: float = 1.0,
                   generator: torch.Generator | None = None) -> list[np.ndarray]:
    """Generates one ``[K, T]`` code array per caption, ``T`` in ``[min_seconds, seconds] * frame_rate``.

    One batched KV-cached decode; with ``cfg_scale`` != 1 the batch also holds the caption-less rows.
    """
    spec = audio_spec(tokenizer)
    vocab = AudioVocab.from_dict(spec["vocab"])
    layout = make_layout(spec["layout"], vocab)
    fr = float(spec["codec"]["frame_rate"])
    max_frames = max(1, round(seconds * fr))
    min_frames = max_frames if min_seconds is None else max(1, min(max_frames, round(min_seconds * fr)))
    dev = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    cap_max = int(spec.get("max_caption_tokens", 64))
    rows = [[bos] + tokenizer.encode(p, add_special_tokens=False)[:cap_max] + [vocab.boa_id] for p in prompts]
    B = len(rows)
    guided = cfg_scale is not None and cfg_scale != 1.0
    if guided:
        rows += [[bos, vocab.boa_id]] * B
    n_ctx = getattr(model.config, "max_position_embeddings", None)
    need = max(map(len, rows)) + layout.num_tokens(max_frames) + 1
    if n_ctx and need > n_ctx:
        raise ValueError(f"{seconds:g} s needs {need} positions but the model has {n_ctx}; lower --seconds")
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)     # left padding
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cons = [LayoutConstraint(layout, min_frames, max_frames) for _ in range(B)]
    bodies: list[list[int]] = [[] for _ in range(B)]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache_kw = _cache_kwarg(model)
    past, last_pos = _out_cache(out), pos[:, -1]
    logits = out.logits[:, -1].float()
    V = logits.shape[-1]
    masks: dict[tuple, torch.Tensor] = {}
    for _ in range(layout.num_tokens(max_frames) + 1):
        if guided:
            logits = logits[B:] + cfg_scale * (logits[:B] - logits[B:])
        nxt = torch.full((B,), vocab.eoa_id, dtype=torch.long, device=dev)
        for i, c in enumerate(cons):
            if c.done:
                continue
            allowed = c.allowed()
            if len(allowed) == 1 and allowed[0][1] - allowed[0][0] == 1:
                tok = allowed[0][0]                                  # forced by the layout
            else:
                key = tuple(allowed)
                if key not in masks:                                 # a handful of distinct sets per layout
                    keep = torch.zeros(V, dtype=torch.bool, device=dev)
                    for lo, hi in allowed:
                        keep[lo:hi] = True
                    masks[key] = ~keep
                lg = logits[i].masked_fill(masks[key], float("-inf"))
                if temperature <= 0:
                    tok = int(lg.argmax())
                else:
                    lg = _filter((lg / temperature)[None], top_k, top_p)[0]
                    tok = int(torch.multinomial(torch.softmax(lg, -1), 1, generator=generator))
            c.push(tok)
            if not c.done:
                bodies[i].append(tok)
            nxt[i] = tok
        if all(c.done for c in cons):
            break
        step = torch.cat([nxt, nxt]) if guided else nxt
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=step[:, None], attention_mask=attn, position_ids=last_pos[:, None],
                    use_cache=True, **{cache_kw: past})
        past, logits = _out_cache(out), out.logits[:, -1].float()
    return [layout.decode(b, strict=c.done) for b, c in zip(bodies, cons)]


def _cache_kwarg(model) -> str:
    """The KV-cache argument of the model's forward: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _out_cache(out):
    return out["cache"] if "cache" in out else out.past_key_values


def run(cfg: AudioGenConfig) -> list[dict]:
    """Loads model + codec, generates every prompt, writes WAV/NPY/JSON; returns the per-prompt records."""
    if not cfg.model:
        raise ArgumentError("--model is required (an HF model dir, e.g. OUTPUT_DIR/final)")
    if bool(cfg.prompt) == bool(cfg.prompts_file):
        raise ArgumentError("give exactly one of --prompt or --prompts_file")
    if cfg.prompts_file and not Path(cfg.prompts_file).is_file():
        raise ArgumentError(f"--prompts_file {cfg.prompts_file}: no such file (one caption per line expected)")
    prompts = [cfg.prompt] if cfg.prompt else [ln.strip() for ln in Path(cfg.prompts_file).read_text().splitlines()
                                               if ln.strip()]
    if not prompts:
        raise ArgumentError(f"{cfg.prompts_file}: no prompts (one caption per line)")
    loaded = load_model(cfg.model, cfg.lora or None, cfg.tokenizer or None, cfg.device, cfg.dtype)
    spec = audio_spec(loaded.tokenizer, cfg.model)
    cfg_scale = cfg.cfg_scale if cfg.cfg_scale is not None else (3.0 if spec.get("caption_dropout", 0) > 0 else 1.0)
    if cfg_scale != 1.0 and not spec.get("caption_dropout"):
        log.warning("classifier-free guidance requested but the training data had no caption dropout: the "
                    "caption-less branch was never trained")
    codec = None
    if not cfg.codes_only:
        codec = check_codec(Codec(cfg.codec or codec_dir_of(spec, cfg.model), str(loaded.device)), spec, cfg.model)
    gen = torch.Generator(device=loaded.device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    single = bool(cfg.prompt)
    out_dir = Path(cfg.out).parent if single else Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for b in range(0, len(prompts), cfg.batch_size):
        batch = prompts[b:b + cfg.batch_size]
        t0 = time.perf_counter()
        codes = generate_codes(loaded.model, loaded.tokenizer, batch, cfg.seconds, cfg.min_seconds, cfg.temperature,
                               cfg.top_k, cfg.top_p, cfg_scale, gen)
        t_gen = time.perf_counter() - t0
        for j, (prompt, c) in enumerate(zip(batch, codes)):
            stem = Path(cfg.out).with_suffix("") if single else out_dir / f"{b + j:03d}"
            np.save(f"{stem}.npy", c)
            secs = c.shape[1] / float(spec["codec"]["frame_rate"])
            rec = {"prompt": prompt, "codes": f"{stem}.npy", "num_frames": int(c.shape[1]), "seconds": secs,
                   "gen_seconds_batch": t_gen, "real_time_factor": t_gen / max(1e-9, sum(x.shape[1] for x in codes)
                                                                            / float(spec["codec"]["frame_rate"])),
                   "cfg_scale": cfg_scale, "layout": spec["layout"]}
            if codec is not None:
                audio = codec.decode(c)[0]
                rec["wav"] = write_wav(f"{stem}.wav", audio, codec.sample_rate)
                rec["sample_rate"] = codec.sample_rate
                rec["random_codec"] = codec.random_init
            records.append(rec)
            log.info("%s -> %s (%.2f s, %d frames)", prompt, rec.get("wav", rec["codes"]), secs, c.shape[1])
    results = {"config": asdict(cfg), "results": records}
    (Path(f"{Path(cfg.out).with_suffix('')}.json") if single else out_dir / "results.json").write_text(
        json.dumps(results, indent=2) + "\n")
    return records


def decode_file(cfg: AudioGenConfig) -> dict:
    """``--decode codes.npy``: saved codes ``[K, T]`` -> WAV at ``cfg.out`` with ``--codec`` (else the codec
    recorded in ``--model``'s tokenizer; no weights are loaded). Returns the record."""
    src = Path(cfg.decode)
    if not src.is_file():
        raise ArgumentError(f"--decode {src}: no such file (a codes .npy written by inference.audio)")
    try:
        codes = np.load(src, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ArgumentError(f"--decode {src}: not a NumPy .npy file of codes ({type(e).__name__})") from None
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ArgumentError(f"--decode {src}: expected integer codes [codebooks, frames], got {codes.dtype} "
                         f"{list(codes.shape)}")
    if cfg.codec:
        codec = Codec(cfg.codec, _device(cfg.device))
    elif cfg.model:
        model = resolve_model_path(cfg.model, "model")
        spec = audio_spec(load_tokenizer(cfg.tokenizer or model), cfg.model)
        codec = check_codec(Codec(codec_dir_of(spec, cfg.model), _device(cfg.device)), spec, cfg.model)
    else:
        raise ArgumentError("--decode needs --codec DIR (the codec the model was trained with) or --model DIR")
    if codes.shape[0] != codec.num_codebooks or codes.min() < 0 or codes.max() >= codec.codebook_size:
        raise ArgumentError(f"--decode {src}: codes {list(codes.shape)} in [{codes.min()}, {codes.max()}] do not fit "
                         f"codec {codec.path} ({codec.num_codebooks} codebooks x {codec.codebook_size}); pass the "
                         "codec the model was trained with")
    wav = write_wav(cfg.out, codec.decode(codes)[0], codec.sample_rate)
    return {"codes": str(src), "wav": wav, "num_frames": int(codes.shape[1]), "sample_rate": codec.sample_rate,
            "seconds": codes.shape[1] / codec.frame_rate, "random_codec": codec.random_init}


def _device(device: str) -> str:
    return str(auto_device(device))


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    ap = argparse.ArgumentParser(prog="python -m inference.audio", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=S, help="YAML/JSON file with AudioGenConfig fields")
    ap.add_argument("--model", "--base_model", dest="model", default=S)
    ap.add_argument("--lora", "--lora_model", dest="lora", default=S)
    ap.add_argument("--tokenizer", "--tokenizer_path", dest="tokenizer", default=S)
    ap.add_argument("--codec", default=S)
    ap.add_argument("--prompt", default=S)
    ap.add_argument("--prompts_file", "--data_file", dest="prompts_file", default=S)
    ap.add_argument("--out", default=S)
    ap.add_argument("--out_dir", "--output_dir", dest="out_dir", default=S)
    ap.add_argument("--seconds", type=float, default=S)
    ap.add_argument("--min_seconds", type=float, default=S)
    ap.add_argument("--temperature", type=float, default=S)
    ap.add_argument("--top_k", type=int, default=S)
    ap.add_argument("--top_p", type=float, default=S)
    ap.add_argument("--cfg_scale", type=float, default=S)
    ap.add_argument("--batch_size", type=int, default=S)
    ap.add_argument("--seed", type=int, default=S)
    ap.add_argument("--codes_only", action="store_true", default=S)
    ap.add_argument("--decode", metavar="CODES_NPY", default=S)
    ap.add_argument("--device", default=S)
    ap.add_argument("--dtype", default=S)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of AudioGenConfig fields")
    return document(ap, AudioGenConfig)


@exit_on_argument_error
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    cfg = from_namespace(AudioGenConfig, ns)
    if cfg.decode:
        if "out" not in vars(ns):
            cfg.out = str(Path(cfg.decode).with_suffix(".wav"))
        records = [decode_file(cfg)]
    else:
        records = run(cfg)
    print(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed: tokens/s of tunesmith's generation path vs plain ``model.generate`` defaults, against the
memory-bandwidth bound of the device.

    python -m benchmarks.generate_speed --model llama-small --batch 1            # CPU, random init preset
    python -m benchmarks.generate_speed --model llama2-7b --batch 16             # GPU, 7B shape, bf16
    python -m benchmarks.generate_speed --model outputs/run/final --batch 1      # a trained HF dir

Paths timed (each on the same random prompt ids, batch ``B`` x ``prompt_len``):

``hf_default``  ``model.generate(input_ids, max_new_tokens=N)`` with nothing else set (greedy, dynamic
                KV cache) -- what a user gets out of the box.
``tunesmith``   ``model.generate`` with the kwargs of :class:`inference.generation.SamplingConfig` (the
                ChatMusician sampling settings predict/demo use: temperature, top-k, top-p,
                repetition penalty) -- the path ``inference.generation.generate[_batch]`` runs.
``static``      greedy with ``cache_implementation="static"``: a pre-allocated KV cache; on CUDA
                transformers then compiles the decode step with ``torch.compile`` (CUDA graphs) -- the
                candidate fast path for inference.
``tunesmith_abc`` (with ``--constrain abc``, a model dir with a tokenizer) the ``tunesmith`` path under
                the ABC constraint (inference/abc_constraint.py); the prompt is an ABC header
                (``--abc_header``) followed by the random ids' place, so the reply continues a tune body.
                Its ``vs tunesmith`` column is the constraint's cost.

Every path is forced to exactly ``N`` new tokens (``min_new_tokens``), so a random model's early EOS
cannot flatter it. Decode rate excludes the prompt: ``B * (N - 2) / (t(N) - t(2))`` where ``t(k)`` is the
best-of-``repeats`` wall time of generating ``k`` tokens (prefill and the first steps cancel out); repeats interleave the paths.

Bound: a decode step must read every weight once plus the KV cache (:func:`benchmarks.flops.
decode_bytes_per_step`, at the mean context ``prompt_len + N/2``), so
``bound tokens/s = B * bandwidth / bytes_per_step``; bandwidth from the datasheet (H100 3.35 TB/s, H200
4.8 TB/s) or measured on CPU (memcpy, read+write). ``% of bound`` = measured / bound.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from benchmarks.common import (
    default_output,
    environment,
    markdown_table,
    parse_config,
    write_json,
)
from benchmarks.flops import Shape, decode_bytes_per_step, device_peak
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from inference.generation import SamplingConfig, constraint_kwargs
from inference.loading import auto_device, auto_dtype, load_model
from training.presets import is_preset, preset_config

PATHS = ("hf_default", "tunesmith", "static")


@dataclass
class GenerateSpeedConfig:
    model: str = "llama-small"
    """preset name (random init) or HF model dir"""
    batch: int = 1
    """sequences decoded together"""
    prompt_len: int = 128
    """prompt tokens per sequence (random ids)"""
    new_tokens: int = 128
    """tokens generated per sequence (forced, EOS suppressed)"""
    paths: str = ",".join(PATHS)
    """comma-separated subset of hf_default, tunesmith, static"""
    repeats: int = 3
    """timed repetitions per measurement (best is kept)"""
    vocab_size: int = 32000
    """vocabulary of a preset model"""
    device: str = "auto"
    """auto | cpu | cuda"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32"""
    seed: int = 0
    """seed of the random init and prompt ids"""
    output: str | None = None
    """JSON result path (default outputs/benchmarks/generate_speed_<model>_b<B>.json)"""
    constrain: str = "none"
    """none | abc: also time the tunesmith path under the ABC constraint"""
    abc_header: str = "X:1\\nT:Speed\\nM:6/8\\nL:1/8\\nK:D\\n"
    """prompt of the constrained path (escapes allowed)"""

    def validate(self):
        bad = [p for p in self.path_list() if p not in PATHS + ("tunesmith_abc",)]
        if bad:
            raise ArgumentError(f"--paths: unknown {bad}; choose from {list(PATHS)}")
        for name in ("batch", "prompt_len", "repeats"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ArgumentError(f"--new_tokens must be >= 2 (the decode rate needs steps after the first), got "
                             f"{self.new_tokens}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ArgumentError(f"--dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ArgumentError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.constrain not in ("none", "abc"):
            raise ArgumentError(f"--constrain must be none or abc, got {self.constrain!r}")
        if self.constrain == "abc":
            if is_preset(self.model):
                raise ArgumentError("--constrain abc needs a model dir with a tokenizer (a preset has none)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ArgumentError(f"--device {self.device}: this machine has no GPU (use --device auto or cpu)")

    def path_list(self) -> list[str]:
        paths = [p.strip() for p in self.paths.split(",") if p.strip()]
        return paths + ["tunesmith_abc"] if self.constrain == "abc" else paths


def build_model(cfg: GenerateSpeedConfig):
    """(model, device, dtype, eos_id, pad_id) for a preset (random init) or an HF dir (whose tokenizer
    is kept as ``cfg._tokenizer`` for the constrained path)."""
    if is_preset(cfg.model):
        from transformers import LlamaForCausalLM

        device = auto_device(cfg.device)
        dtype = auto_dtype(device, cfg.dtype)
        mcfg = preset_config(cfg.model, vocab_size=cfg.vocab_size, pad_token_id=3)
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            model = LlamaForCausalLM(mcfg).to(dtype)
        model.eval()
        return model, device, dtype, mcfg.eos_token_id, 3
    loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    cfg._tokenizer = loaded.tokenizer
    return loaded.model, loaded.device, loaded.dtype, loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id


def path_kwargs(path: str, eos_id: int, pad_id: int, n: int) -> dict:
    """``generate`` kwargs of one timed path, forcing exactly ``n`` new tokens."""
    if path == "hf_default":
        kw = {"max_new_tokens": n}
    elif path == "tunesmith":
        kw = SamplingConfig(max_new_tokens=n).generate_kwargs(SimpleNamespace(eos_token_id=eos_id,
                                                                              pad_token_id=pad_id))
    elif path == "static":
        kw = {"max_new_tokens": n, "do_sample": False, "cache_implementation": "static"}
    elif path == "tunesmith_abc":
        kw = path_kwargs("tunesmith", eos_id, pad_id, n)
        kw["_constrain"] = True
    else:
        raise ValueError(path)
    kw["min_new_tokens"] = n
    kw.setdefault("pad_token_id", pad_id)
    return kw


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_generate(model, input_ids, kwargs: dict, device, tokenizer=None, top_k: int = 0) -> tuple[float, int]:
    """Wall time of one generate call and the number of new tokens per sequence it produced (a constrained
    path builds its processor inside the timed region: per-call setup is part of its cost)."""
    attn = torch.ones_like(input_ids)
    kwargs = dict(kwargs)
    constrain = kwargs.pop("_constrain", False)
    _sync(device)
    t = time.perf_counter()
    if constrain:
        prompts = tokenizer.batch_decode(input_ids.tolist())
        extra, _ = constraint_kwargs(tokenizer, prompts, SamplingConfig(), "abc")
        kwargs.update(extra)
    out = model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
    _sync(device)
    return time.perf_counter() - t, out.shape[1] - input_ids.shape[1]


def run(cfg: GenerateSpeedConfig) -> dict:
    from tqdm.auto import tqdm

    model, device, dtype, eos_id, pad_id = build_model(cfg)
    shape = Shape.from_config(model.config)
    g = torch.Generator().manual_seed(cfg.seed)
    low = 4 if shape.vocab > 8 else 0  # skip the special ids (unk/bos/eos/pad)
    input_ids = torch.randint(low, shape.vocab, (cfg.batch, cfg.prompt_len), generator=g).to(device)
    tok = getattr(cfg, "_tokenizer", None)
    abc_ids = None
    if cfg.constrain == "abc":
        header = cfg.abc_header.encode("utf-8").decode("unicode_escape")
        h = tok.encode("\n" + header, add_special_tokens=False)[-cfg.prompt_len:]  # X: starts a line
        abc_ids = torch.cat([input_ids[:, :cfg.prompt_len - len(h)].cpu(),
                             torch.tensor([h] * cfg.batch)], dim=1).to(device)

    peak = device_peak(device, dtype)
    elem = torch.finfo(dtype).bits // 8
    bytes_step = decode_bytes_per_step(shape, cfg.batch, cfg.prompt_len + cfg.new_tokens // 2, elem)
    bound = cfg.batch * peak.bandwidth / bytes_step["total"]

    paths = cfg.path_list()
    lengths = (2, cfg.new_tokens)
    kwargs = {(p, n): path_kwargs(p, eos_id, pad_id, n) for p in paths for n in lengths}
    def timed(key, kw):
        if key[0] == "tunesmith_abc":
            return time_generate(model, abc_ids, kw, device, tok)
        return time_generate(model, input_ids, kw, device)

    for key, kw in tqdm(kwargs.items(), desc="warm-up (compiles on CUDA)", unit="run"):
        timed(key, kw)
    # repeats interleave the paths, so a slow spell of a shared machine hits all of them alike
    best = {key: float("inf") for key in kwargs}
    for _ in tqdm(range(cfg.repeats), desc="generate_speed", unit="repeat"):
        for key, kw in kwargs.items():
            t, n = timed(key, kw)
            if n != key[1]:
                raise RuntimeError(f"{key[0]}: generated {n} tokens instead of {key[1]}")
            best[key] = min(best[key], t)
    rows, results = [], {}
    for path in paths:
        t1, tn = best[(path, 2)], best[(path, cfg.new_tokens)]
        decode = cfg.batch * (cfg.new_tokens - 2) / max(tn - t1, 1e-9)
        results[path] = {"decode_tokens_per_s": decode, "end_to_end_tokens_per_s": cfg.batch * cfg.new_tokens / tn,
                         "time_s": tn, "time_2_tokens_s": t1, "pct_of_bandwidth_bound": 100 * decode / bound}
        rows.append([path, cfg.batch, f"{decode:,.1f}", f"{results[path]['end_to_end_tokens_per_s']:,.1f}",
                     f"{bound:,.1f}", f"{results[path]['pct_of_bandwidth_bound']:.1f}%"])
    if "hf_default" in results:
        for r in rows:
            r.append(f"{results[r[0]]['decode_tokens_per_s'] / results['hf_default']['decode_tokens_per_s']:.2f}x")
    if "tunesmith_abc" in results and "tunesmith" in results:
        results["tunesmith_abc"]["vs_tunesmith"] = (results["tunesmith_abc"]["decode_tokens_per_s"]
                                                    / results["tunesmith"]["decode_tokens_per_s"])

    out = {
        "benchmark": "generate_speed", "config": {k: v for k, v in cfg.__dict__.items() if not k.startswith("_")}, "device": peak.as_dict(), "dtype": str(dtype),
        "model_params": sum(p.numel() for p in model.parameters()), "bytes_per_decode_step": bytes_step,
        "bandwidth_bound_tokens_per_s": bound, "results": results, "environment": environment(),
    }
    path = cfg.output or default_output("generate_speed", cfg.model, extra=f"_b{cfg.batch}")
    write_json(path, out)
    headers = ["path", "batch", "decode tok/s", "end-to-end tok/s", "bound tok/s", "% of bound"]
    if "hf_default" in results:
        headers.append("vs hf_default")
    print(f"\n{cfg.model} on {peak.device} ({peak.source} bandwidth {peak.bandwidth / 1e9:.1f} GB/s), {dtype}, "
          f"prompt {cfg.prompt_len}, {cfg.new_tokens} new tokens")
    print(markdown_table(headers, rows))
    if "vs_tunesmith" in results.get("tunesmith_abc", {}):
        print(f"ABC constraint: {100 * results['tunesmith_abc']['vs_tunesmith']:.1f}% of the unconstrained "
              "tunesmith decode rate")
    print(f"results -> {path}")
    out["output"] = str(path)
    return out


@exit_on_argument_error
def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(GenerateSpeedConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()

"""Load a model for inference/evaluation: an HF model dir (or hub id), optionally plus a PEFT LoRA adapter.

Used by predict, the demo and every benchmark, so that "base + adapter" and "merged dir" behave the same.
Safe by default: no ``trust_remote_code``, safetensors preferred.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def auto_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """CUDA with bf16 -> bf16, older CUDA -> fp16, CPU -> fp32 (bf16 matmuls are ~9x slower on these CPUs)."""
    if dtype != "auto":
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp32": torch.float32, "float32": torch.float32}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # never fall back to pad = eos silently: generation would stop on padding
        raise ValueError(f"{path}: tokenizer has no pad token; re-save it with a distinct pad (pad != eos)")
    return tok


def adapter_vocab_size(lora_model: str | os.PathLike) -> int | None:
    """Rows of the full ``embed_tokens`` / ``lm_head`` copies a PEFT adapter carries (``modules_to_save``
    or ``save_embedding_layers``), or None when it carries none. The base must be resized to exactly this
    before the adapter is attached (it may differ from ``len(tokenizer)``, e.g. padded to a multiple)."""
    p = Path(lora_model)
    rows = None
    if (p / "adapter_model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(p / "adapter_model.safetensors"), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    elif (p / "adapter_model.bin").is_file():
        sd = torch.load(p / "adapter_model.bin", map_location="cpu", weights_only=True)
        shapes = {k: list(v.shape) for k, v in sd.items()}
    else:
        return None
    for k, shape in shapes.items():
        if ("embed_tokens" in k or "lm_head" in k) and "lora_" not in k and len(shape) == 2:
            rows = max(rows or 0, int(shape[0]))
    return rows


def resize_for_adapter(model, tokenizer, lora_model: str | None = None) -> int:
    """Grows the base's embeddings to what the adapter (or else the tokenizer) needs; new rows are the
    mean of the old ones (training's rule, deterministic). Returns the final number of rows."""
    from training.model import resize_embeddings

    need = len(tokenizer)
    if lora_model:
        need = adapter_vocab_size(lora_model) or need
    resize_embeddings(model, need)
    return model.get_input_embeddings().weight.shape[0]


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype


def load_model(base_model: str, lora_model: str | None = None, tokenizer_path: str | None = None,
               device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
               merge_lora: bool = False) -> Loaded:
    """Loads ``base_model`` (+ ``lora_model``) in eval mode on ``device``.

    The tokenizer comes from ``tokenizer_path``, else the adapter dir (training saves it there, with any
    added tokens), else the base dir. When the tokenizer has more tokens than the base embeddings (pad or
    music tokens added in training), the base is resized before the adapter is attached, so adapters
    with ``modules_to_save`` (embed_tokens, lm_head) load with matching shapes.
    """
    dev = auto_device(device)
    dt = auto_dtype(dev, dtype)
    tok_src = tokenizer_path or (lora_model if lora_model and _has_tokenizer(lora_model) else base_model)
    tok = load_tokenizer(tok_src, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dt, trust_remote_code=trust_remote_code,
                                                 use_safetensors=None)
    resize_for_adapter(model, tok, lora_model)
    if lora_model:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, lora_model)
        if merge_lora:
            model = model.merge_and_unload()
    model.to(dev).eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return Loaded(model, tok, dev, dt)

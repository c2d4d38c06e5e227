"""Load a model for inference/evaluation: an HF model dir (or hub id), optionally plus a PEFT LoRA adapter.

Used by predict, the demo and every benchmark, so that "base + adapter" and "merged dir" behave the same.
Safe by default: no ``trust_remote_code``, safetensors preferred.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

# Tokenizer/adapter helpers live in the training layer (merge.py needs them too); re-exported here.
from training.hf_io import (  # noqa: F401
    ModelPathError,
    adapter_vocab_size,
    has_tokenizer,
    load_tokenizer,
    resize_for_adapter,
    resolve_model_path,
    unloadable_is_a_path_error,
)


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

    A path that does not exist (or an uncached Hub id when offline) raises :class:`ModelPathError` at once.
    """
    base_model = resolve_model_path(base_model, "model")
    lora_model = lora_model and resolve_model_path(lora_model, "adapter")
    tokenizer_path = tokenizer_path and resolve_model_path(tokenizer_path, "tokenizer")
    dev = auto_device(device)
    dt = auto_dtype(dev, dtype)
    tok_src = tokenizer_path or (lora_model if lora_model and has_tokenizer(lora_model) else base_model)
    with unloadable_is_a_path_error("tokenizer" if tokenizer_path else "model", tok_src):
        tok = load_tokenizer(tok_src, trust_remote_code)
    with unloadable_is_a_path_error("model", base_model):
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

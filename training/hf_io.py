"""Hugging Face I/O shared by training/merge.py and inference/loading.py: tokenizer loading with the pad != eos
rule, and sizing a base model's embeddings for a PEFT adapter (resized vocabularies, modules_to_save).

It lives in the training layer because merge.py (training) needs it and a lower layer may not import inference.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer


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

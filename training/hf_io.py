"""Hugging Face I/O shared by training/merge.py and inference/loading.py: checking a model/adapter argument
before transformers sees it, tokenizer loading with the pad != eos rule, and sizing a base model's
embeddings for a PEFT adapter (resized vocabularies, modules_to_save).

It lives in the training layer because merge.py (training) needs it and a lower layer may not import inference.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoTokenizer

from data_preprocess.hub import ArgumentError, could_be_hub_id, offline
from data_preprocess.model_source import ModelSourceError, resolve_source
from training.model import resize_embeddings
from training.oom import is_out_of_memory

# kind of argument -> (the file that marks such a dir, the fix shown when the argument is wrong)
_KINDS = {
    "model": ("config.json", "pass the directory written by training/merge.py or train.py (…/final)"),
    "adapter": ("adapter_config.json", ("pass the adapter dir of a LoRA run (OUTPUT_DIR/final of training/train.py "
                                        "with train_type=lora); a full model goes in --base_model alone")),
    "tokenizer": ("tokenizer_config.json", "pass a tokenizer dir (e.g. DATA_DIR/tokenizer) or leave the option out"),
}


class ModelPathError(ArgumentError):
    """A model / adapter / tokenizer argument that is neither a usable local dir nor a usable Hub id;
    ``str(e)`` is one line with the argument, the reason and the fix."""


def resolve_model_path(name: str, kind: str = "model") -> str:
    """Checks a model (``kind`` model | adapter | tokenizer) argument before anything is loaded.

    A model / tokenizer given as a named source (``smollm2-135m``) or a ``PATH.gguf`` is first imported (once)
    into a cached HF dir by :func:`data_preprocess.model_source.resolve_source`, and that dir is returned.
    An existing local dir is local (it must hold the kind's marker file: config.json, adapter_config.json,
    a tokenizer file); a name that cannot be a Hub id is a missing local path; a Hub id while
    must be in the local HF cache, whether or not HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set: tunesmith never
    downloads a model (a typo'd name would otherwise hang on the network, then end in a traceback). Returns
    the name (``~`` expanded); raises :class:`ModelPathError`."""
    marker, fix = _KINDS[kind]
    if kind in ("model", "tokenizer"):
        try:
            name = resolve_source(name)
        except ModelSourceError as e:
            raise ModelPathError(f"{kind} {e}") from None
    p = Path(name).expanduser()
    if p.is_dir():
        ok = has_tokenizer(p) if kind == "tokenizer" else (p / marker).is_file()
        if not ok:
            raise ModelPathError(f"{kind} {name}: {_what_is(p, marker)}, not {'an' if kind == 'adapter' else 'a'} "
                                 f"{kind} dir. Fix: {fix}")
        return str(p)
    if p.exists():
        raise ModelPathError(f"{kind} {name}: is a file, not a directory. Fix: {fix}")
    if not could_be_hub_id(name):
        raise ModelPathError(f"{kind} {name}: no such directory (and not a Hub id). Fix: {fix}")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, marker), str):
        state = " while HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set" if offline("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") \
            else " (tunesmith never downloads models)"
        raise ModelPathError(f"{kind} {name}: no such directory, and as a Hub id it is not downloaded{state}. Fix: a "
                             f"local dir, or download it where there is network (huggingface-cli download {name})")
    return name


def _what_is(p: Path, marker: str) -> str:
    """What a dir that lacks ``marker`` holds instead (the usual mix-ups of train.py's outputs)."""
    if (p / "adapter_config.json").is_file():
        return "a LoRA adapter dir"
    if (p / "config.json").is_file():
        return "a full model dir"
    if (p / "final").is_dir():
        return f"a training output dir (its export is {p / 'final'})"
    if (p / "tunesmith.json").is_file():
        return "a DeepSpeed checkpoint (training/merge.py --deepspeed_checkpoint converts it)"
    return f"no {marker} in it"


def has_tokenizer(path: str | os.PathLike) -> bool:
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
    need = len(tokenizer)
    if lora_model:
        need = adapter_vocab_size(lora_model) or need
    resize_embeddings(model, need)
    return model.get_input_embeddings().weight.shape[0]


@contextmanager
def unloadable_is_a_path_error(kind: str, path: str):
    """A dir that passed :func:`resolve_model_path` but cannot be loaded (a config.json alone, a truncated
    model.safetensors, an invalid config.json, no tokenizer): one-line :class:`ModelPathError` instead of the
    loader's traceback. Running out of memory is not the dir's fault and propagates."""
    try:
        yield
    except Exception as e:  # transformers/safetensors raise many types for a broken dir
        if is_out_of_memory(e) or isinstance(e, ModelPathError):
            raise
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelPathError(f"{kind} {path}: cannot be loaded ({type(e).__name__}: {why}). Fix: pass a complete "
                             "model dir (config.json, model.safetensors and tokenizer files, as written by "
                             "training/merge.py or train.py), or re-export it") from None

"""Named LLaMA architecture presets, randomly initialised for from-scratch training and benchmarks.

A model source is either a local HF model directory / hub id (a real LLaMA2 checkpoint) or one of the
names below. Presets never download anything.
"""
from __future__ import annotations

from transformers import LlamaConfig

# name -> LlamaConfig kwargs (vocab_size is taken from the tokenizer when a job builds the model)
PRESETS: dict[str, dict] = {
    # unit tests: a few hundred thousand parameters
    "llama-tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=2048),
    # the CPU default run of scripts/train.sh: ~5 M non-embedding parameters
    "llama-small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=8, max_position_embeddings=2048),
    # GPU benchmarks
    "llama-1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=4096),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096),
}

_COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
               attention_bias=False, mlp_bias=False, initializer_range=0.02)


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_config(name: str, vocab_size: int = 32000, bos_token_id: int = 1, eos_token_id: int = 2,
                  pad_token_id: int | None = None, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} or give a model directory")
    kw = {**_COMMON, **PRESETS[name], **overrides}
    return LlamaConfig(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, **kw)


def count_params(cfg: LlamaConfig) -> dict:
    """Parameter counts of a LLaMA config without building it (embeddings and lm_head separate)."""
    h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    attn = h * h * 2 + h * kv * 2
    mlp = 3 * h * i
    norms = 2 * h
    body = n * (attn + mlp + norms) + h
    emb = v * h
    head = 0 if cfg.tie_word_embeddings else v * h
    return {"body": body, "embed": emb, "lm_head": head, "total": body + emb + head}

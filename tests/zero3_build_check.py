"""Run under ``torchrun --nproc_per_node 2`` by tests/test_train_zero3_init.py (not collected by pytest).

Builds each case twice on every rank -- plainly, and under ZeRO-3 (deepspeed.zero.Init through
training.model.build_model) -- and writes what rank 0 saw to OUT/result.json: whether every base parameter was
partitioned at creation, how much of it this rank holds, and whether the gathered ZeRO-3 weights equal the
plain build's."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from training.checkpoint import gathered_state_dict
from training.config import TrainConfig
from training.model import build_model

DS = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def main(tok_dir: str, hf_dir: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cases = {"preset_full": dict(model="llama-tiny"),
             "preset_lora": dict(model="llama-tiny", train_type="lora", lora_r=4),
             "hf_dir_resized_lora": dict(model=hf_dir, train_type="lora", lora_r=4)}
    result = {"world": world}
    for name, kw in cases.items():
        cfg = TrainConfig(**kw)
        plain, info0 = build_model(cfg, tok, "fp32")
        base_dir = Path(out) / f"base_{name}"
        z3, info3 = build_model(cfg, tok, "fp32", save_base_to=base_dir, ds_config=DS, rank=rank)
        ref = plain.state_dict()
        got = gathered_state_dict(z3, rank=rank)
        base = [p for n, p in z3.named_parameters() if not ("lora_" in n or "modules_to_save" in n)]
        r = {"info_equal": info0 == info3, "vocab": [info3.vocab_before, info3.vocab_after],
             "n_base": len(base), "n_partitioned": sum(hasattr(p, "ds_id") for p in base),
             "unpartitioned": [n for n, p in z3.named_parameters() if not hasattr(p, "ds_id")
                               and not ("lora_" in n or "modules_to_save" in n)],
             "local_fraction": sum(p.ds_tensor.numel() for p in base if hasattr(p, "ds_id"))
             / sum(p.ds_numel for p in base if hasattr(p, "ds_id")),
             "zero3_enabled_after": __import__("transformers").integrations.is_deepspeed_zero3_enabled()}
        if rank == 0:
            r["keys_equal"] = sorted(ref) == sorted(got)
            r["max_abs_diff"] = max(float((ref[k].float() - got[k].float()).abs().max()) for k in ref)
            from safetensors.torch import load_file

            saved = load_file(str(base_dir / "model.safetensors"))
            plain_base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain
            pb = {k.replace("base_layer.", "").replace("original_module.", ""): v  # PEFT names -> base names
                  for k, v in plain_base.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
            r["saved_base_equal"] = all(torch.equal(saved[k], pb[k]) for k in saved if k in pb) and \
                set(saved) <= set(pb) and len(saved) > 0
            if name == "hf_dir_resized_lora":
                emb = got["base_model.model.model.embed_tokens.original_module.weight"]
                old = info3.vocab_before
                r["new_rows_are_mean"] = bool(torch.allclose(emb[old:], emb[:old].mean(0, keepdim=True).expand_as(emb[old:])))
            result[name] = r
        del plain, z3
    if rank == 0:
        (Path(out) / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""training/merge.py: a LoRA adapter trained with added tokens + modules_to_save merges into a model whose
logits equal the adapter model's; a real ZeRO-3 DeepSpeed checkpoint becomes an HF dir that plain
transformers loads and that computes what the live engine computed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ADDED = ["<bar>", "<beat>", "<tie>", "<triplet>"]
TEXT = "X:1\nT:Probe\nM:6/8\nL:1/8\nK:D\n<bar>dAF A2B<beat>c3 d2e<tie>|]"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A real (tiny) LoRA fine-tune: tokenizer grows by 4 tokens, base resized as training does, PEFT
    LoRA on attention + MLP with embed_tokens/lm_head in modules_to_save, 6 AdamW steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.model import resize_embeddings

    out = tmp_path_factory.mktemp("lora_run")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(ADDED)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    resize_embeddings(base, len(tok))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
                                            modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tok([TEXT, TEXT[::-1]], return_tensors="pt", padding=True).input_ids
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it really trained
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # non-zero LoRA deltas (B starts at zero)
    model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    return {"base": tiny_model_dir, "adapter": out / "adapter", "tok_len": len(tok), "root": out}


def _logits(model, tok, text=TEXT):
    ids = tok(text, return_tensors="pt").input_ids
    assert (ids >= tok.convert_tokens_to_ids(ADDED[0])).any()  # the added tokens are in the probe
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merge_lora_with_added_tokens_equals_adapter_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from inference.loading import adapter_vocab_size, load_model
    from training.merge import main

    base_rows = AutoModelForCausalLM.from_pretrained(lora_run["base"]).get_input_embeddings().weight.shape[0]
    assert adapter_vocab_size(lora_run["adapter"]) == lora_run["tok_len"] > base_rows

    out = tmp_path / "merged"
    rc = main(["--base_model", str(lora_run["base"]), "--lora_model", str(lora_run["adapter"]),
               "--output_dir", str(out), "--max_shard_size", "300KB"])
    assert rc == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert info["verified"] and info["vocab_rows"] == lora_run["tok_len"] and info["base_rows"] == base_rows
    assert info["checks"]["in_memory"]["max_abs_diff"] < 1e-4 and info["checks"]["reloaded"]["max_abs_diff"] < 1e-4
    # sharded safetensors + tokenizer + chat template + generation config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not list(out.glob("*.bin"))
    gen = GenerationConfig.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert (gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty) == (0.2, 40, 0.9, 1.1)
    assert tok.chat_template and len(tok) == lora_run["tok_len"]

    # independent check: plain transformers on the merged dir == inference.loading's base + adapter
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.vocab_size == lora_run["tok_len"]
    adapter = load_model(str(lora_run["base"]), str(lora_run["adapter"]), device="cpu", dtype="fp32")
    ref = _logits(adapter.model, adapter.tokenizer)
    got = _logits(merged, tok)
    assert (ref - got).abs().max().item() < 1e-4
    # and the comparison is sensitive: the base without the adapter gives clearly different logits
    plain = load_model(str(lora_run["base"]), None, tokenizer_path=str(lora_run["adapter"]), device="cpu", dtype="fp32")
    assert (ref - _logits(plain.model, plain.tokenizer)).abs().max().item() > 1e-2


def test_merge_refuses_non_empty_output_and_overwrites_on_request(lora_run, tmp_path):
    from training.merge import main

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["--ori_model_dir", str(lora_run["base"]), "--model_dir", str(lora_run["adapter"]),  # ChatMusician flags
            "--output_dir", str(out), "--dtype", "bf16"]
    with pytest.raises(SystemExit, match="not empty; pass --overwrite"):
        main(args)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(SystemExit, match="overlaps the input"):
        main(["--base_model", str(lora_run["base"]), "--lora_model", str(lora_run["adapter"]),
              "--output_dir", str(lora_run["adapter"]), "--overwrite"])
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    info = json.loads((out / "merge_info.json").read_text())
    assert info["dtype"] == "bfloat16" and info["verified"]
    assert 0 < info["checks"]["reloaded"]["max_abs_diff"] <= info["checks"]["reloaded"]["tolerance"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_compare_flags_a_real_difference():
    from training.merge import compare

    ref = [torch.randn(1, 5, 11)]
    assert compare(ref, [ref[0].clone()], torch.float32)["ok"]
    bad = ref[0].clone()
    bad[0, 2, 3] += 0.01
    res = compare(ref, [bad], torch.float32)
    assert not res["ok"] and res["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


# A real DeepSpeed ZeRO-3 run in a child process (its own process group / env), writing the checkpoint
# layout of CONTRACTS.md; the live engine's gathered logits are saved as the reference.
DS_SCRIPT = r"""
import json, os, socket, sys
import torch
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import deepspeed
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM
from training.model import resize_embeddings
from training.presets import preset_config

tiny, root = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(tiny)
tok.add_tokens(["<bar>", "<beat>"])
os.makedirs(f"{root}/tokenizer"); tok.save_pretrained(f"{root}/tokenizer")
ids = tok(["X:1\nK:D\n<bar>abc def<beat>|]", "X:2\nK:G\nGAB<bar>cde|]"], return_tensors="pt", padding=True).input_ids
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["embed_tokens", "lm_head"]}
for kind in ("lora", "full"):
    out = f"{root}/{kind}"
    torch.manual_seed(0)
    cfg = preset_config("llama-tiny", vocab_size=len(tok) - 2, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg)
    meta = {"model_source": "llama-tiny", "train_type": kind, "vocab_size": len(tok),
            "tokenizer": f"{root}/tokenizer", "global_step": 3, "zero_stage": 3, "dtype": "fp32"}
    if kind == "lora":  # the random base is saved once (as the engine does) so the adapter has a real base
        model.save_pretrained(f"{out}/base_model"); tok.save_pretrained(f"{out}/base_model")
        meta["base_model_dir"] = f"{out}/base_model"
        resize_embeddings(model, len(tok))
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=LORA["target_modules"],
                                                 modules_to_save=LORA["modules_to_save"]))
        meta["lora"] = LORA
    else:
        resize_embeddings(model, len(tok))
    ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    tag = "step-00000003"
    engine.save_checkpoint(f"{out}/checkpoints", tag=tag)
    json.dump(meta, open(f"{out}/checkpoints/{tag}/tunesmith.json", "w"))
    open(f"{out}/checkpoints/latest", "w").write(tag)
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        torch.save(engine.module(input_ids=ids).logits.float(), f"{out}/ref_logits.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_zero3_checkpoint_to_hf_dir_loads_with_plain_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.merge import main

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(tiny_model_dir), str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for kind, src in (("lora", tmp_path / "lora"), ("full", tmp_path / "full" / "checkpoints" / "step-00000003")):
        ckpt = tmp_path / kind / "checkpoints" / "step-00000003"
        assert list(ckpt.glob("zero_pp_rank_0_mp_rank_00_optim_states.pt"))  # a real ZeRO checkpoint
        out = tmp_path / f"hf_{kind}"
        assert main(["--deepspeed_checkpoint", str(src), "--output_dir", str(out)]) == 0
        model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft, no tunesmith
        tok = AutoTokenizer.from_pretrained(out)
        assert model.config.vocab_size == len(tok)
        ids = tok(["X:1\nK:D\n<bar>abc def<beat>|]", "X:2\nK:G\nGAB<bar>cde|]"], return_tensors="pt",
                  padding=True).input_ids
        with torch.no_grad():
            got = model(input_ids=ids).logits
        ref = torch.load(tmp_path / kind / "ref_logits.pt", weights_only=True)
        assert (got - ref).abs().max().item() < 1e-4, kind
        info = json.loads((out / "merge_info.json").read_text())
        assert info["verified"] and info["tunesmith"]["zero_stage"] == 3

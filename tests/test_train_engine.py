"""The training engine end to end with real DeepSpeed on CPU (fp32, llama-tiny, vocab 400, 64-token blocks).

Few launches, many assertions each (launch overhead dominates on CPU):

* ZeRO-3 LoRA (+ embed_tokens/lm_head via modules_to_save), pt mode, plain ``python train.py``:
  loss falls, export check (HF export reloaded with plain transformers+peft gives the engine's logits),
  killed by SIGKILL in the middle of the step-6 save -> ``latest`` stays on step 3 -> ``resume=auto``
  reproduces the straight run exactly; the same job on 2 ranks (deepspeed launcher) gives the same
  losses; the adapter equals the one trained under ZeRO-0.
* ZeRO-2 LoRA with dropout 0.1, sft mode: SIGKILL after step 4, ``--resume auto`` -> identical losses
  (the RNG state, hence the dropout masks, is restored); keep_last retention.
* ZeRO-2 full pt with block-diagonal attention, a torch optimizer and gradient checkpointing: loss falls,
  1 rank vs 2 ranks (torchrun) with the same global batch give the same losses; the HF-logits loss and
  ``attn_implementation=varlen`` (document bounds instead of the 4D mask) train the same model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_fixtures import losses, run_train, write_shards

pytestmark = pytest.mark.slow

COMMON = ["model=llama-tiny", "max_steps=6", "global_batch_size=4", "micro_batch_size=2", "lr=3e-3",
          "warmup_ratio=0.2", "log_every=1", "save_every=3", "eval_every=3", "eval_max_batches=2",
          "report_to=none", "keep_last=3"]
LORA = ["train_type=lora", "lora_r=4", "lora_alpha=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("train_data")
    return {"pt": write_shards(tokenizer_dir, root / "pt", "pt"), "sft": write_shards(tokenizer_dir, root / "sft", "sft")}


@pytest.fixture(scope="module")
def z3_lora(data, tmp_path_factory):
    """The reference ZeRO-3 LoRA pt run (1 rank, 2 accumulation steps), with export check and wandb offline."""
    out = tmp_path_factory.mktemp("z3_lora")
    args = [f"data_dir={data['pt']}", *COMMON, *LORA, "lora_dropout=0.0", "ds_config=ds_configs/zero3.json"]
    p = run_train([*args, f"output_dir={out}", "verify_export=true", "report_to=tensorboard,wandb"],
                  env={"WANDB_MODE": "offline"})
    return {"out": out, "args": args, "log": p.stdout}


def _falls(ls: dict[int, float]) -> bool:
    steps = sorted(ls)
    return ls[steps[-1]] < ls[steps[0]] - 0.1


def test_zero3_lora_run_exports_and_logs(z3_lora):
    out = z3_lora["out"]
    ls = losses(out)
    assert sorted(ls) == [1, 2, 3, 4, 5, 6] and _falls(ls), ls
    assert "inside lm_head's forward: ZeRO-3" in z3_lora["log"]  # loss=auto runs the chunked loss under ZeRO-3 too
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in ev] == [3, 6]
    assert all(math.isfinite(r["val_bpc"]) and r["val_bpc"] > 0 and abs(r["val_ppl"] - math.exp(r["val_loss"])) < 1e-6
               for r in ev)
    full = [r for r in recs if "tokens_per_s" in r]
    assert full and all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in full)
    # HF export reloaded with plain transformers + peft reproduces the engine's logits
    check = [r for r in recs if "export_max_abs_logit_diff" in r]
    assert check and check[-1]["export_max_abs_logit_diff"] < 1e-4
    assert (out / "loss_curve.png").stat().st_size > 1000 and any((out / "tb").iterdir())
    assert any((out / "wandb").glob("offline-run-*"))
    job = json.loads((out / "job.json").read_text())
    assert job["ds_config"]["zero_optimization"]["stage"] == 3 and job["gradient_accumulation_steps"] == 2
    assert job["ds_config"]["optimizer"]["params"]["lr"] == 3e-3 and job["ds_config"]["gradient_clipping"] == 1.0
    # the checkpoint layout of training/checkpoint.py's docstring
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000006"
    info = json.loads((root / "step-00000006" / "tunesmith.json").read_text())
    assert info["train_type"] == "lora" and info["global_step"] == 6 and info["zero_stage"] == 3
    assert info["lora"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert Path(info["base_model_dir"]) == (out / "base_model").resolve()
    assert (out / "base_model" / "model.safetensors").is_file() and (out / "final" / "adapter_config.json").is_file()
    assert "[memory]" in z3_lora["log"] and "Estimated memory needed" in z3_lora["log"]
    assert "built inside deepspeed.zero.Init" in z3_lora["log"]


def _adapter(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter_model.safetensors"))


def test_zero3_adapter_complete_and_equal_to_zero0(z3_lora, tmp_path):
    run_train([*z3_lora["args"], "ds_config=ds_configs/zero0.json", f"output_dir={tmp_path}"])
    a3, a0 = _adapter(z3_lora["out"] / "final"), _adapter(tmp_path / "final")
    assert sorted(a3) == sorted(a0)
    n_layers, proj = 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i in range(n_layers):
        for m in proj:
            for ab in ("lora_A", "lora_B"):
                assert any(f"layers.{i}." in k and f"{m}.{ab}" in k for k in a3), (i, m, ab)
    assert any("embed_tokens" in k for k in a3) and any("lm_head" in k for k in a3)
    for k in a3:
        assert a3[k].shape == a0[k].shape and a3[k].numel() > 0, k
        torch.testing.assert_close(a3[k], a0[k], atol=1e-5, rtol=1e-4, msg=k)
    # trained, not the initialisation: lora_B starts at zero
    assert any(a3[k].abs().sum() > 0 for k in a3 if "lora_B" in k)


def test_zero3_kill_mid_save_then_resume_is_exact(z3_lora, tmp_path):
    args = [*z3_lora["args"], f"output_dir={tmp_path}"]
    p = run_train(args, fault="6:mid_save", expect_rc=None)
    assert p.returncode in (-9, 137), p.stdout[-3000:]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000003"  # the save of step 6 never completed
    assert (root / "step-00000006").is_dir() and not (root / "step-00000006" / "tunesmith.json").exists()
    run_train([*args, "resume=auto"])
    assert (root / "latest").read_text().strip() == "step-00000006"
    ref, got = losses(z3_lora["out"]), losses(tmp_path)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-6, (s, ref[s], got[s])


def test_zero3_chunked_loss_equals_the_hf_loss(z3_lora, tmp_path):
    """Under ZeRO-3 the chunked loss runs as the forward of the module owning lm_head's weight (here PEFT's
    trainable modules_to_save copy), so DeepSpeed gathers the weight and reduce-scatters its gradient: the same
    losses and the same trained adapter as the model's own logits loss."""
    p = run_train([*z3_lora["args"], "loss=hf", f"output_dir={tmp_path}"])
    assert "loss: loss=hf" in p.stdout
    ref, got = losses(z3_lora["out"]), losses(tmp_path)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-4, (s, ref[s], got[s])
    a_chunked, a_hf = _adapter(z3_lora["out"] / "final"), _adapter(tmp_path / "final")
    for k in a_hf:
        torch.testing.assert_close(a_chunked[k], a_hf[k], atol=1e-5, rtol=1e-4, msg=k)


def test_zero3_full_chunked_loss_equals_the_hf_loss(data, tmp_path):
    """Full fine-tune under ZeRO-3 on 2 ranks: the chunked loss inside the (plain Linear) lm_head's forward trains
    the same model as the HF logits loss."""
    args = [f"data_dir={data['pt']}", *COMMON, "max_steps=4", "save_every=0", "eval_every=0",
            "ds_config=ds_configs/zero3.json", "optimizer=torch"]
    chunked = run_train([*args, f"output_dir={tmp_path / 'chunked'}"], launcher="torchrun", nproc=2)
    assert "inside lm_head's forward: ZeRO-3" in chunked.stdout
    run_train([*args, "loss=hf", f"output_dir={tmp_path / 'hf'}"], launcher="torchrun", nproc=2)
    ref, got = losses(tmp_path / "hf"), losses(tmp_path / "chunked")
    assert sorted(got) == [1, 2, 3, 4] and _falls(got), got
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-4, (s, ref[s], got[s])


def test_zero3_two_ranks_same_losses(z3_lora, tmp_path):
    run_train([*z3_lora["args"], f"output_dir={tmp_path}"], launcher="deepspeed", nproc=2)
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["world_size"] == 2 and job["gradient_accumulation_steps"] == 1
    ref, got = losses(z3_lora["out"]), losses(tmp_path)
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-4, (s, ref[s], got[s])


def test_zero2_lora_dropout_sft_resume_exact(data, tmp_path):
    args = [f"data_dir={data['sft']}", "mode=sft", *COMMON, *LORA, "lora_dropout=0.1", "lr=2e-2",
            "ds_config=ds_configs/zero2.json", "keep_last=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train([*args, f"output_dir={straight}"])
    ref = losses(straight)
    assert _falls(ref), ref
    assert sorted(p.name for p in (straight / "checkpoints").glob("step-*")) == ["step-00000006"]  # keep_last=1
    p = run_train([*args, f"output_dir={killed}"], fault="4:after_step", expect_rc=None)
    assert p.returncode in (-9, 137)
    run_train(["--resume", "auto", *args, f"output_dir={killed}"])
    got = losses(killed)
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-6, (s, ref[s], got[s])


def test_zero2_full_pt_one_vs_two_ranks(data, tmp_path):
    """Full fine-tuning, block-diagonal attention, a client torch optimizer and gradient checkpointing."""
    args = [f"data_dir={data['pt']}", *COMMON, "doc_attention=block", "ds_config=ds_configs/zero2.json",
            "optimizer=torch", "gradient_checkpointing=true", "save_every=0"]
    one = run_train([*args, f"output_dir={tmp_path / 'one'}"])
    run_train([*args, f"output_dir={tmp_path / 'two'}"], launcher="torchrun", nproc=2)
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert _falls(ref), ref
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-4, (s, ref[s], got[s])
    # loss=auto ran the chunked cross-entropy (no full logits); the HF-logits loss trains the same model
    assert "loss: chunked cross-entropy" in one.stdout
    hf = run_train([*args, "loss=hf", f"output_dir={tmp_path / 'hf'}"])
    assert "loss: loss=hf" in hf.stdout
    for s, v in losses(tmp_path / "hf").items():
        assert abs(ref[s] - v) <= 1e-4, (s, ref[s], v)
    # attn_implementation=varlen: the same block attention from document bounds (no 4D mask), the same model;
    # its export reloads in plain transformers (sdpa + the 4D mask) with the engine's logits
    run_train([*args, "attn_implementation=varlen", "verify_export=true", f"output_dir={tmp_path / 'varlen'}"])
    for s, v in losses(tmp_path / "varlen").items():
        assert abs(ref[s] - v) <= 1e-4, (s, ref[s], v)
    recs = [json.loads(x) for x in (tmp_path / "varlen" / "metrics.jsonl").read_text().splitlines()]
    assert [r["export_max_abs_logit_diff"] for r in recs if "export_max_abs_logit_diff" in r][-1] < 1e-4
    assert "varlen" not in (tmp_path / "varlen" / "final" / "config.json").read_text()
    job = json.loads((tmp_path / "two" / "job.json").read_text())
    assert job["world_size"] == 2 and "optimizer" not in job["ds_config"]  # the client optimizer replaced it
    assert sorted(p.name for p in (tmp_path / "one" / "checkpoints").glob("step-*")) == ["step-00000006"]
    # full export: a plain safetensors model dir that transformers loads
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")
    assert m.get_input_embeddings().weight.shape[0] == 400

"""Job config: YAML + key=value loading, ds_config "auto" filling, and every refusal (each fires before any
model is loaded, with a one-line reason and a fix). Also the pure pieces of the loop: lr schedule, data
order independence from the world size, block-diagonal mask. In-process and fast, except one CLI check."""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from test_train_fixtures import REPO, write_shards

from training.config import (
    ConfigError,
    Environment,
    TrainConfig,
    fill_ds_config,
    load_config,
    validate,
)
from training.data import (
    BlockStream,
    step_micro_batches,
    val_batches,
)
from training.masks import block_diagonal_mask
from training.schedule import lr_at

CPU1 = Environment(world_size=1, device="cpu")


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory, tokenizer_dir):
    return write_shards(tokenizer_dir, tmp_path_factory.mktemp("cfg") / "pt", "pt", n_tunes=20, n_val=3)


def cfg_of(pt_dir, tmp_path, **kw) -> TrainConfig:
    base = {"data_dir": str(pt_dir), "model": "llama-tiny", "output_dir": str(tmp_path / "out"),
            "global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2}
    return TrainConfig(**{**base, **kw})


def refused(cfg, env=CPU1) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg, env)
    msg = str(e.value)
    assert "\n" not in msg and "Fix:" in msg, msg
    return msg


def test_yaml_and_overrides(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("mode: sft\nlr: 1e-4\nlora_target_modules: [q_proj, v_proj]\ngradient_checkpointing: yes\n")
    cfg = load_config(str(y), ["lr=2e-4", "max_steps=10", "report_to=tensorboard,wandb", "lora_modules_to_save=none"],
                      resume="auto")
    assert cfg.mode == "sft" and cfg.lr == 2e-4 and isinstance(cfg.lr, float) and cfg.max_steps == 10
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.gradient_checkpointing is True
    assert cfg.report_to == ["tensorboard", "wandb"] and cfg.lora_modules_to_save is None and cfg.resume == "auto"
    j = tmp_path / "job.json"
    j.write_text(json.dumps({"train_type": "lora", "lora_r": 8}))
    assert load_config(str(j)).lora_r == 8
    for bad, where in ((["lrr=1"], "unknown config key 'lrr'"), (["max_steps=ten"], "max_steps"),
                       (["gradient_checkpointing=maybe"], "not a boolean"), (["lr"], "expected key=value")):
        with pytest.raises(ConfigError, match=where):
            load_config(None, bad)
    # a typo'd key suggests the key meant (close spelling, or the HF Trainer name's counterpart)
    for typo, meant in (("lrr", "['lr', "), ("learning_rate", "['lr']"), ("max_step", "['max_steps']"),
                        ("num_train_epochs", "['num_epochs']"), ("gradient_checkpoint", "['gradient_checkpointing', ")):
        with pytest.raises(ConfigError, match=rf"unknown config key '{typo}'\. Fix: use one of {re.escape(meant)}"):
            load_config(None, [f"{typo}=1"])
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: cannot parse"):
        load_config(str(tmp_path / "bad.yaml"))


def test_valid_job_and_ds_autos(pt_dir, tmp_path):
    cfg = cfg_of(pt_dir, tmp_path, ds_config="ds_configs/zero3_offload.json", lr=1e-4, grad_clip=0.5)
    facts = validate(cfg, Environment(world_size=2, device="cuda", bf16_supported=True))
    assert facts["precision"] == "bf16"
    ds = fill_ds_config(facts["ds"], cfg, 2, facts["precision"], facts["hidden_size"], on_cpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    # older GPUs: fp16 with dynamic loss scaling; CPU: fp32 and torch AdamW (FusedAdam is CUDA-only)
    f16 = validate(cfg, Environment(world_size=2, device="cuda", bf16_supported=False))["precision"]
    assert f16 == "fp16"
    ds16 = fill_ds_config(facts["ds"], cfg, 2, f16, 64, on_cpu=False)
    assert ds16["fp16"]["enabled"] is True and ds16["fp16"]["loss_scale"] == 0
    cpu = validate(cfg_of(pt_dir, tmp_path), CPU1)
    assert cpu["precision"] == "fp32"
    one = fill_ds_config(cpu["ds"], cfg_of(pt_dir, tmp_path), 1, "fp32", 64, True)
    assert one["optimizer"]["params"]["torch_adam"]
    # a GPU job on a machine that cannot compile FusedAdam (this one: no CUDA toolkit) uses torch's AdamW in
    # DeepSpeed instead of failing in deepspeed.initialize; where it can, DeepSpeed's FusedAdam stays
    from training.config import fused_adam_unavailable

    gpu = fill_ds_config(cpu["ds"], cfg_of(pt_dir, tmp_path), 1, "bf16", 64, on_cpu=False)["optimizer"]["params"]
    why = fused_adam_unavailable()
    assert gpu.get("torch_adam", False) == (why is not None)
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        assert "nvcc" in why
    # ZeRO-2 buckets: 2e8 elements; overlap_comm (double-buffered buckets) only with more than one rank
    z1, z2 = one["zero_optimization"], fill_ds_config(cpu["ds"], cfg_of(pt_dir, tmp_path), 2, "fp32", 64, True)[
        "zero_optimization"]
    assert z1["stage"] == 2 and z1["overlap_comm"] is False and z2["overlap_comm"] is True
    assert z1["reduce_bucket_size"] == z1["allgather_bucket_size"] == 200_000_000
    assert z["overlap_comm"] is True and z["reduce_bucket_size"] == 64 * 64  # ZeRO-3 on 2 ranks


def test_refusals(pt_dir, tmp_path, tokenizer_dir):
    def c(**kw):
        return cfg_of(pt_dir, tmp_path, **kw)

    assert "fp16 needs a GPU" in refused(c(precision="fp16"))
    assert "no bf16" in refused(c(precision="bf16"), Environment(1, "cuda", False))
    assert "needs DeepSpeed's optimizer" in refused(c(ds_config="ds_configs/zero2_offload.json", optimizer="torch"))
    no_opt = tmp_path / "offload_no_opt.json"
    d = json.loads((REPO / "ds_configs/zero2_offload.json").read_text())
    del d["optimizer"]
    no_opt.write_text(json.dumps(d))
    assert "no \"optimizer\" block" in refused(c(ds_config=str(no_opt)))
    assert "offload_param needs ZeRO stage 3" in refused(c(ds_config=str(_with(tmp_path, "zero2_offload.json", lambda d: d[
        "zero_optimization"].update(offload_param={"device": "cpu"})))))
    assert "not divisible by micro_batch_size x world size = 2 x 3" in refused(c(), Environment(3, "cpu"))
    assert "not found" in refused(c(ds_config="ds_configs/zero9.json"))
    assert "no meta.json" in refused(c(data_dir=str(tmp_path / "nowhere")))
    broken = tmp_path / "broken"
    shutil.copytree(pt_dir, broken)
    (broken / "train.pos.bin").unlink()
    assert "missing shard file" in refused(c(data_dir=str(broken)))
    assert "holds 'pt' shards" in refused(c(mode="sft"))
    # a tokenizer other than the shards' one (one token more)
    from transformers import AutoTokenizer

    other = tmp_path / "other_tok"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<codec_0>"])
    tok.save_pretrained(other)
    assert "is not the one the shards" in refused(c(tokenizer=str(other)))
    # a model dir whose vocabulary is smaller than the tokenizer, LoRA without trainable embeddings
    small = tmp_path / "small_model"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 64,
                                                   "max_position_embeddings": 2048}))
    assert "leaves the new rows untrained" in refused(c(model=str(small), train_type="lora", lora_modules_to_save=[]))
    validate(c(model=str(small), train_type="lora"), CPU1)  # default modules_to_save: accepted
    short = tmp_path / "short_model"
    short.mkdir()
    (short / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 400, "max_position_embeddings": 32}))
    assert "max_position_embeddings 32" in refused(c(model=str(short)))
    assert "no config.json" in refused(c(model=str(tmp_path / "missing_model")))
    assert "lora_target_modules is empty" in refused(c(train_type="lora", lora_target_modules=[]))
    assert "warmup_ratio" in refused(c(warmup_ratio=1.5))
    assert "report_to" in refused(c(report_to=["mlflow"]))
    assert "doc_attention" in refused(c(doc_attention="full"))
    assert "Fix: doc_attention=block" in refused(c(attn_implementation="varlen"))  # varlen is block attention
    validate(c(attn_implementation="varlen", doc_attention="block"), CPU1)
    assert "loss=" in refused(c(loss="liger"))
    validate(c(loss="chunked", ds_config="ds_configs/zero3.json"), CPU1)  # runs inside lm_head's forward there
    assert "LoRA adapter on lm_head" in refused(c(loss="chunked", train_type="lora",
                                                  lora_target_modules=["q_proj", "lm_head"]))
    assert "loss_chunk_size" in refused(c(loss_chunk_size=0))
    assert "compile=true with ZeRO-3" in refused(c(compile=True, ds_config="ds_configs/zero3.json"))
    assert "gradient_checkpointing is off" in refused(c(gradient_checkpointing_every=2))
    assert "must be >= 1" in refused(c(gradient_checkpointing=True, gradient_checkpointing_every=0))
    validate(c(gradient_checkpointing=True, gradient_checkpointing_every=2), CPU1)
    ck = tmp_path / "out" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "latest").write_text("step-00000002\n")
    assert "already has checkpoints" in refused(c())
    validate(c(resume="auto"), CPU1)
    assert "no such checkpoint" in refused(c(resume=str(tmp_path / "nope")))


def test_empty_val_split_hint_says_what_works(tokenizer_dir, tmp_path):
    """The old hint, `--val_ratio 0.02`, was already the default: following it changed nothing."""
    no_val = write_shards(tokenizer_dir, tmp_path / "no_val", "pt", n_tunes=8, n_val=0)
    msg = refused(cfg_of(no_val, tmp_path))
    assert "the val split is empty" in msg and "at least 2 tunes/records" in msg and "--val_ratio > 0" in msg
    assert "it then keeps at least one for val" in msg


def _with(tmp_path, name, edit):
    d = json.loads((REPO / "ds_configs" / name).read_text())
    edit(d)
    p = tmp_path / f"edited_{name}"
    p.write_text(json.dumps(d))
    return p


def test_cli_refuses_before_loading_a_model(pt_dir, tmp_path, capsys, monkeypatch):
    """train.py's entry point: exit code 2 and the one-line message on stderr, before anything starts."""
    from training.train import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # recorded, so main()'s launcher defaults are undone after the test
        monkeypatch.delenv(k)
    rc = main([f"data_dir={pt_dir}", "model=llama-tiny", "precision=fp16", f"output_dir={tmp_path}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("config error: precision=fp16 needs a GPU") and "Fix: precision=fp32" in last
    assert not (tmp_path / "job.json").exists()  # nothing was started


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1e-3, 0.05, 0.1) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)        # linear warmup over 5 steps
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))                            # then monotone decay
    assert lrs[-1] == pytest.approx(1e-4)                                           # to lr * min_lr_ratio
    mid = lr_at(5 + 48, 100, 1e-3, 0.05, 0.1)  # half way through the cosine part (~= midpoint of 1e-3 and 1e-4)
    assert abs(mid - (1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 48 / 95)))) < 1e-12


def test_global_batch_independent_of_world_size():
    s = BlockStream(37, seed=3)
    for step in range(12):  # crosses epochs (37 blocks, 8 per step)
        one = np.concatenate(step_micro_batches(s, step * 8, 8, 2, 0, 1))
        two = np.concatenate([m for r in range(2) for m in step_micro_batches(s, step * 8, 8, 2, r, 2)])
        assert sorted(one) == sorted(two)
    epoch0 = s.take(0, 37)
    assert sorted(epoch0) == list(range(37))
    # validation: same batch count on every rank, every block exactly once
    parts = [val_batches(7, 2, r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    rows = np.concatenate([np.concatenate(p) for p in parts])
    assert sorted(rows[rows >= 0]) == list(range(7))


def test_block_diagonal_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_diagonal_mask(pos) == 0
    allowed = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                            [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], allowed)


def test_make_batch_on_a_device_equals_host_batch_and_counts_targets_on_the_host(pt_dir):
    from data_preprocess.shards import open_split
    from training.data import make_batch

    split = open_split(pt_dir, "train")
    rows = np.array([0, 1, -1])  # -1: a filler row with no targets
    for doc_attention in ("causal", "block"):
        host = make_batch(split, rows, doc_attention)
        dev = make_batch(split, rows, doc_attention, device="cpu")
        for f in ("input_ids", "labels", "position_ids", "attention_mask"):
            assert torch.equal(getattr(host, f), getattr(dev, f)), f
        assert host.attention_mask.dim() == (4 if doc_attention == "block" else 2)
        recount = int((host.labels[:, 1:] != -100).sum())
        assert host.n_targets == dev.n_targets == recount > 0 and host.to("cpu").num_targets == recount
        assert host.cu_seqlens is None and "cu_seq_lens_q" not in host.model_inputs()
    # varlen: a plain 2D mask plus the document bounds over the flattened rows, which survive .to()
    vl = make_batch(split, rows, "varlen").to("cpu")
    assert vl.attention_mask.dim() == 2
    flat = vl.position_ids.reshape(-1)
    starts = [i for i in range(flat.numel()) if flat[i] == 0 or i % vl.input_ids.shape[1] == 0]
    assert vl.cu_seqlens.tolist() == starts + [flat.numel()] and vl.cu_seqlens.dtype == torch.int32
    assert vl.max_seqlen == max(b - a for a, b in zip(vl.cu_seqlens.tolist(), vl.cu_seqlens.tolist()[1:]))
    inputs = vl.model_inputs()
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"] is vl.cu_seqlens and inputs["max_length_q"] == vl.max_seqlen

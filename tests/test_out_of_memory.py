"""A job that does not fit: the engine ends with one ``error:`` line (where, how much, what to change) and exit
status 3, and the speed harness writes a ``"fits": false`` verdict -- instead of allocator tracebacks.

The out-of-memory is real, not simulated: a 1-layer LLaMA whose 16.8 M-token vocabulary (hidden size 4, tied
embeddings: 256 MiB on disk) makes the HF loss's logits of one micro-batch of 256 x 64 tokens 1 TiB. The host's
allocator refuses that at once under Linux's default overcommit heuristic (an allocation larger than RAM + swap
fails), so nothing near it is ever touched: the runs peak at about 1 GiB. Skipped where the kernel would grant it
(``vm.overcommit_memory=1``), since the matmul would then really fill memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_fixtures import REPO, run_train, write_shards

from training.oom import host_memory_bytes, is_out_of_memory, out_of_memory_summary

TIB = 2**40
VOCAB = 2**24


def _overcommit_refuses(nbytes: int) -> bool:
    try:
        mode = int(Path("/proc/sys/vm/overcommit_memory").read_text())
    except OSError:
        return False
    import psutil

    return mode in (0, 2) and nbytes > psutil.virtual_memory().total + psutil.swap_memory().total


needs_refusal = pytest.mark.skipif(not _overcommit_refuses(TIB), reason="the kernel would grant a 1 TiB allocation "
                                   "(vm.overcommit_memory=1 or a 1 TiB host): the job would really fill memory")


@pytest.fixture(scope="module")
def huge_vocab(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("oom")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = write_shards(tokenizer_dir, root / "data", "pt", max_len=64, n_tunes=120)
    return {"model": root / "model", "data": data}


def test_allocation_failures_are_recognised():
    with pytest.raises(RuntimeError) as cpu:  # the real CPU allocator, refusing 128 TiB
        torch.empty(2**45)
    assert is_out_of_memory(cpu.value)
    assert out_of_memory_summary(cpu.value) == "out of host memory, tried to allocate 131,072.00 GiB"
    cuda = torch.OutOfMemoryError(  # the class and the message format of torch's CUDA caching allocator
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.05 GiB "
        "is free. Including non-PyTorch memory, this process has 78.13 GiB memory in use.")
    assert is_out_of_memory(cuda) and out_of_memory_summary(cuda) == "CUDA out of memory, tried to allocate 2.00 GiB"
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_host_memory_is_ram_or_the_cgroup_limit():
    import psutil

    ram = psutil.virtual_memory().total
    assert 0 < host_memory_bytes() <= ram
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and limit.read_text().strip().isdigit() and int(limit.read_text()) < ram:
        assert host_memory_bytes() == int(limit.read_text())


@needs_refusal
@pytest.mark.slow
def test_engine_out_of_memory_is_one_line_and_exit_3(huge_vocab, tmp_path):
    p = run_train([f"data_dir={huge_vocab['data']}", f"model={huge_vocab['model']}", "train_type=full", "loss=hf",
                   "micro_batch_size=256", "global_batch_size=256", "max_steps=1", "report_to=none",
                   f"output_dir={tmp_path / 'run'}"], expect_rc=3)
    assert "Traceback" not in p.stdout, p.stdout[-3000:]
    # the estimate before the model is built already says so, against the host's memory on CPU
    warn = [ln for ln in p.stdout.splitlines() if "this will not fit" in ln]
    assert len(warn) == 1 and "per rank (its share of this host's memory)" in warn[0]
    err = [ln for ln in p.stdout.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, p.stdout[-3000:]
    e = err[0]
    assert e.startswith("error: rank 0 ran out of memory in training step 1, micro_batch_size 256 x 64 tokens: "
                        "out of host memory, tried to allocate 1,024.00 GiB; RSS ")
    assert "estimated before training: 3,07" in e  # 1.25 GiB of model states + 3 x 1 TiB of logits
    # the estimate puts the HF loss's logits first, so the likeliest fix is named first
    assert "Fix: loss=chunked (the HF loss's full logits are ~3,072.0 GiB of the estimate), gradient_checkpointing" in e
    assert (tmp_path / "run" / "job.json").is_file()


@needs_refusal
@pytest.mark.slow
def test_harness_out_of_memory_is_a_does_not_fit_verdict(huge_vocab, tmp_path):
    out = tmp_path / "tp.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--model", str(huge_vocab["model"]),
                        "--train_type", "full", "--loss", "hf", "--seq_len", "64", "--micro_batch_size", "256",
                        "--steps", "1", "--warmup", "0", "--ds_config", "ds_configs/zero0.json", "--output", str(out)],
                       cwd=REPO, capture_output=True, text=True, check=False, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert ("tunesmith: does not fit -- ran out of memory in step 1: out of host memory, tried to allocate "
            "1,024.00 GiB; peak ") in p.stdout
    saved = json.loads(out.read_text())
    assert saved["fits"] is False and saved["out_of_memory"] == ["tunesmith"]
    r = saved["results"]["tunesmith"]
    assert r["fits"] is False and r["out_of_memory"]["at"] == "in step 1"
    assert "can't allocate memory" in r["out_of_memory"]["message"]
    assert 0 < r["peak_memory_gb"] < 8
    est = r["memory_estimate_gb"]  # against the host's memory: the estimate saw it coming
    assert est["fits"] is False and est["activations"] > 3000


@needs_refusal
def test_predict_batch_out_of_memory_keeps_what_finished(huge_vocab, tmp_path):
    """predict's batch mode: a batch whose logits cannot be allocated (16,384 prompts x 2^24 vocabulary x fp32 =
    1 TiB per decode step) ends with one line naming the prompts, the batch size and the fix, exit 3, and the
    predictions file holding what finished (none here: the first batch is the one that does not fit)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("X:1\n" * 16384)
    out = tmp_path / "pred.json"
    p = subprocess.run([sys.executable, str(REPO / "inference" / "predict.py"), "--base_model", str(huge_vocab["model"]),
                        "--data_file", str(prompts), "--predictions_file", str(out), "--batch_size", "16384",
                        "--max_new_tokens", "2", "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, check=False, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    want = (f"error: out of memory generating prompts 1-16384 of 16384 (--batch_size 16384, --max_new_tokens 2): "
            f"out of host memory, tried to allocate 1,024.00 GiB. The 0 finished predictions are in {out}. Fix: a "
            "smaller --batch_size, a smaller --max_new_tokens, or --dtype bf16")
    assert err == [want], p.stderr[-3000:]
    assert json.loads(out.read_text()) == []

"""Helpers (no tests) shared by tests/test_train_*.py: tiny pt/sft shards of real music21 tunes written with
the real ShardWriter + write_meta, and a runner for train.py subprocesses (plain python, torchrun or the
deepspeed launcher)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_shards(tokenizer_dir: Path, out: Path, mode: str, max_len: int = 64, n_tunes: int = 60,
                 n_val: int = 6) -> Path:
    """pt: each tune is one ``<s> tune </s>`` document, all targets. sft: ``Human: ... </s> Assistant:`` prompt
    (no targets) + the tune and ``</s>`` (targets), ChatMusician's format. The tokenizer is copied to
    OUT/tokenizer like data_preprocess does."""
    from transformers import AutoTokenizer

    from data_preprocess.corpus import iter_tunes
    from data_preprocess.shards import ShardWriter, write_meta
    from data_preprocess.train_tokenizer import tokenizer_identity

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out / "tokenizer")
    tunes = list(itertools.islice(iter_tunes("music21"), n_tunes))
    splits = {}
    for split, chunk in (("train", tunes[n_val:]), ("val", tunes[:n_val])):
        w = ShardWriter(out, split, max_len, len(tok), tok.pad_token_id)
        for t in chunk:
            body = tok.encode(t.text, add_special_tokens=False)
            if mode == "pt":
                w.add([tok.bos_token_id, *body, tok.eos_token_id])
            else:
                m = t.meta
                prompt = (f"Human: Write a tune in {m.get('meter', '4/4')} in the key of {m.get('key', 'C')} "
                          f"titled {m.get('title', 'Untitled')}. ")
                p = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False), tok.eos_token_id,
                     *tok.encode(" Assistant: ", add_special_tokens=False)]
                a = [*body, tok.eos_token_id]
                w.add(p + a, [0] * len(p) + [1] * len(a))
        splits[split] = w.close()
    write_meta(out, {"mode": mode, "max_len": max_len, "vocab_size": len(tok), "pad_id": tok.pad_token_id,
                     "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "splits": splits,
                     "tokenizer": tokenizer_identity(out / "tokenizer", tok)})
    return out


def run_train(args: list[str], launcher: str = "python", nproc: int = 1, env: dict | None = None,
              expect_rc: int | None = 0, timeout: int = 600, fault: str | None = None) -> subprocess.CompletedProcess:
    """Runs training/train.py as a real subprocess; returns it (stdout+stderr in .stdout). ``fault="6:mid_save"``
    runs it through tests/fault_train.py, whose trainer hook SIGKILLs the process at that step's event."""
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    script = str(REPO / "training" / "train.py") if fault is None else str(REPO / "tests" / "fault_train.py")
    if fault is not None:
        args = [fault, *args]
    if launcher == "python":
        cmd = [sys.executable, script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    elif launcher == "deepspeed":
        port = str(29500 + os.getpid() % 1000)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port,
               script]
        e["CUDA_VISIBLE_DEVICES"] = ""
    else:
        raise ValueError(launcher)
    p = subprocess.run(cmd + args, check=False, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if expect_rc is not None and p.returncode != expect_rc:
        raise AssertionError(f"train.py exited {p.returncode} (expected {expect_rc}):\n{p.stdout[-6000:]}")
    return p


def losses(output_dir: Path) -> dict[int, float]:
    from training.metrics import read_metrics

    return {s: r["loss"] for s, r in read_metrics(Path(output_dir) / "metrics.jsonl", "loss").items()}


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())

"""tunesmith's training engine: continual pretraining (pt) and SFT on packed shards, full or LoRA,
DeepSpeed ZeRO 0-3 (+ CPU offload), exactly resumable.

Launch forms (all read the same typed config; ``key=value`` overrides any field of training/config.py)::

    python training/train.py --config configs/pt_small.yaml                     # one process, no launcher
    deepspeed --num_gpus 8 training/train.py --config configs/pt_llama2_7b.yaml data_dir=...
    deepspeed --hostfile hosts training/train.py --config ... --resume auto      # multi-node
    torchrun --nproc_per_node 2 training/train.py --config ... ds_config=ds_configs/zero3.json

Top to bottom: validate the job (before any model loads) -> init distributed -> the recipe
(training/trainer.py: ZeRO memory estimate -> build model -> deepspeed.initialize -> resume -> for each
optimizer step ``train_step``: read the step's micro-batches, count the target tokens of the whole step
over all ranks, forward/backward each micro-batch with loss = sum of token losses / that count, set the
lr, step -> log / eval / checkpoint -> export). Nothing in the loop knows about text: a mode is just a
kind of shard.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import socket
import sys
import textwrap
import time
from pathlib import Path

if __package__ in (None, ""):  # `python training/train.py` and the deepspeed launcher run this as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.distributed as dist

from data_preprocess.config import field_docs
from training.config import ConfigError, TrainConfig, detect_environment, load_config, validate
from training.model import memory_fixes
from training.oom import is_out_of_memory, out_of_memory_summary
from training.trainer import Hook, Progress, Trainer, memory_gb

log = logging.getLogger("tunesmith.train")


def config_keys_help() -> str:
    """``--help``'s list of every TrainConfig key with its default and docstring (docs/reference.md has the same)."""
    docs = field_docs(TrainConfig)
    job = TrainConfig()
    return "config keys (YAML/JSON keys of --config, or key=value overrides):\n" + "\n".join(
        f"  {f.name}={getattr(job, f.name)!r}\n" + textwrap.fill(docs[f.name], 100, initial_indent=" " * 6,
                                                                subsequent_indent=" " * 6)
        for f in dataclasses.fields(TrainConfig))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="tunesmith trainer (DeepSpeed); extra key=value pairs override config "
                                 "fields, e.g. lr=1e-4 train_type=lora ds_config=ds_configs/zero3.json",
                                 epilog=config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML or JSON job config (see configs/)")
    ap.add_argument("--resume", help="auto (OUTPUT_DIR/checkpoints/latest) or a checkpoint path")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher; LOCAL_RANK from the environment wins")
    ap.add_argument("overrides", nargs="*", help="key=value")
    return ap.parse_args(argv)


def launcher_defaults() -> None:
    """Plain ``python training/train.py``: act as rank 0 of a world of 1 on a free local port."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(k, v)


def wait_for_master(timeout_s: float) -> None:
    """A rank other than 0 of a multi-process job waits until rank 0's rendezvous port answers (rank 0 may start
    later: nodes start at different times); when it never does -- a wrong --master_addr, a host the hostfile
    names but this node cannot reach, node 0 not started, a closed port -- one line instead of torch's silent
    30-minute wait. Only the rendezvous is bounded; collectives keep DeepSpeed's timeout."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or rank == 0:
        return
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
    deadline, why = time.monotonic() + timeout_s, ""
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            why = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise ConfigError(f"rank {rank} of {world}: rank 0's rendezvous {addr}:{port} did not answer within "
                              f"{timeout_s:g} s ({why}). Fix: start node 0, pass --master_addr with node 0's address "
                              "as every node reaches it (the hostfile's first host) and open --master_port between "
                              "the nodes; rendezvous_timeout_s=N waits longer")
        time.sleep(0.5)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def main(argv=None, hooks: list[Hook] | tuple = ()) -> int:
    """Runs the job; exit status 0 done, 2 bad config, 3 out of memory (one ``error:`` line per rank that ran out,
    with where it happened and what to change, instead of an allocator traceback). ``hooks``: see
    :class:`training.trainer.Trainer` (tests/fault_train.py installs one)."""
    progress = Progress()
    try:
        return run(argv, progress, hooks)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        device, est = progress.device, progress.estimate or {}
        peak = (f"; {'peak' if device.type == 'cuda' else 'RSS'} {memory_gb(device):.2f} GiB"
                if device is not None else "")
        need = est.get("device_bytes_total")
        plan = f"; estimated before training: {need / 2**30:,.2f} GiB per device" if need else ""
        print(f"error: rank {progress.rank} ran out of memory {progress.at}: {out_of_memory_summary(e)}{peak}"
              f"{plan}. Fix: {memory_fixes(progress.cfg, est)}", file=sys.stderr, flush=True)
        if dist.is_initialized() and dist.get_world_size() == 1:
            dist.destroy_process_group()
        return 3


def run(argv, progress: Progress, hooks: list[Hook] | tuple = ()) -> int:
    """The job (see the module docstring): check it, start the process group, then the :class:`Trainer`'s
    setup -> resume -> train -> export. ``progress`` tells :func:`main` where it is, for an out-of-memory
    message."""
    args = parse_args(argv)
    launcher_defaults()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    progress.rank = rank
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")

    # ---- 1. the job, checked before anything heavy happens ----------------------------------------
    try:
        cfg = load_config(args.config, args.overrides, args.resume)
        env = detect_environment()
        facts = validate(cfg, env)
    except ConfigError as e:
        if rank == 0:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    progress.cfg = cfg

    # ---- 2. distributed ----------------------------------------------------------------------------
    import deepspeed  # after the check: a bad job is refused in a second, not after deepspeed's import

    if env.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    progress.device = device
    try:
        wait_for_master(cfg.rendezvous_timeout_s)
    except ConfigError as e:
        print(f"error: {e}", flush=True)
        return 2
    deepspeed.init_distributed(dist_backend="nccl" if env.device == "cuda" else "gloo")
    seed_all(cfg.seed)

    # ---- 3. the recipe -----------------------------------------------------------------------------
    trainer = Trainer(cfg, device, facts["precision"], rank, world, hooks, progress)
    try:
        trainer.setup(facts, env)
    except ConfigError as e:  # loss=chunked where it cannot run
        if rank == 0:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        step, position = trainer.resume()
    except ConfigError as e:  # a checkpoint that does not fit this job
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    step = trainer.train(step, position)
    trainer.export(step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Checkpoints: DeepSpeed state + our client state + per-rank RNG, an HF export beside each, and a
``latest`` pointer that only ever names a complete checkpoint.

Layout::

    OUTPUT_DIR/checkpoints/latest                 tag of the last COMPLETE checkpoint (written last, atomically)
    OUTPUT_DIR/checkpoints/step-00000100/         engine.save_checkpoint(checkpoints/, tag) + ...
        rng_state_rank{R}.pt                      python/numpy/torch(/cuda) RNG of rank R (dropout included)
        hf/                                       PEFT adapter dir or safetensors model, + tokenizer
        tunesmith.json                            what the checkpoint is (model source, LoRA config, ...)

Save order: DeepSpeed files -> RNG files -> HF export -> tunesmith.json -> barrier -> ``latest``. A
process killed anywhere before the last step leaves ``latest`` on the previous checkpoint, and a later
save of the same tag first removes the partial directory.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("tunesmith.train")
TAG_RE = re.compile(r"^step-(\d{8})$")


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------------------------
# RNG state (per rank; dropout draws from torch's generator)
# ------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                   int(np_state[2]), int(np_state[3]), float(np_state[4])),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------
# gathering parameters (ZeRO-3 partitions them across ranks)
# ------------------------------------------------------------------------------------------------
def gathered_state_dict(module: torch.nn.Module, keep=lambda name: True, rank: int = 0) -> dict:
    """Full tensors of the parameters (and persistent buffers) whose name passes ``keep``, on CPU, on rank 0.

    Under ZeRO-3 each parameter is gathered with ``deepspeed.zero.GatheredParameters`` (a collective: every
    rank must call this); other stages hold full parameters already. Returns {} on ranks != 0."""
    import deepspeed

    out = {}
    # tied parameters under every name (PEFT's ensure_weight_tying shares one Parameter between the embed_tokens and
    # lm_head copies, and an adapter's state dict must hold both names)
    for name, p in module.named_parameters(remove_duplicate=False):
        if not keep(name):
            continue
        if hasattr(p, "ds_id"):  # a ZeRO-3 partitioned parameter
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().cpu().clone()
        elif rank == 0:
            out[name] = p.detach().cpu().clone()
    if rank == 0:  # persistent buffers (LLaMA has none; other architectures may)
        buffer_names = {n for n, _ in module.named_buffers()}
        for name, t in module.state_dict(keep_vars=True).items():
            if name in buffer_names and keep(name):
                out[name] = t.detach().cpu().clone()
    return out


def is_adapter_param(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def export_hf(module: torch.nn.Module, out_dir: Path, tokenizer, lora: bool, base_model_dir: str | None,
              rank: int) -> None:
    """Writes an HF export usable without tunesmith: a PEFT adapter dir (LoRA, incl. modules_to_save) or a
    safetensors model dir (full), plus the tokenizer. Collective under ZeRO-3."""
    sd = gathered_state_dict(module, is_adapter_param if lora else (lambda n: True), rank)
    if rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    if lora:
        # embedding layers are exported through modules_to_save when trained; never implicitly
        peft_cfg = module.peft_config["default"]
        old_base = peft_cfg.base_model_name_or_path
        peft_cfg.base_model_name_or_path = base_model_dir
        module.save_pretrained(str(out_dir), state_dict=sd, safe_serialization=True, save_embedding_layers=False)
        peft_cfg.base_model_name_or_path = old_base
    else:
        module.save_pretrained(str(out_dir), state_dict=sd, safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


# ------------------------------------------------------------------------------------------------
# save / retention / resume
# ------------------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(engine, root: Path, step: int, client_state: dict, info: dict, tokenizer, lora: bool,
                    base_model_dir: str | None, keep_last: int, rank: int, mid_save=None) -> Path:
    """One complete checkpoint of ``step``; returns its directory. Collective (all ranks call it).
    ``mid_save()`` is called between the DeepSpeed files and the HF export (the trainer's ``mid_save`` hook)."""
    tag = tag_of(step)
    d = root / tag
    if rank == 0 and d.exists():  # left over by a run killed mid-save: never mix old and new files
        shutil.rmtree(d)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), d / f"rng_state_rank{rank}.pt")
    if mid_save is not None:
        mid_save()
    export_hf(engine.module, d / "hf", tokenizer, lora, base_model_dir, rank)
    if rank == 0:
        write_atomic(d / "tunesmith.json", json.dumps({**info, "global_step": step}, indent=2) + "\n")
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        write_atomic(root / "latest", tag + "\n")
        prune(root, keep_last, keep=tag)
    dist.barrier()
    return d


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Deletes all but the newest ``keep_last`` complete checkpoints (never ``keep``, the one just saved)."""
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for t in tags[:-keep_last]:
        if t != keep:
            shutil.rmtree(root / t, ignore_errors=True)
            log.info("removed old checkpoint %s (keep_last=%d)", t, keep_last)


def find_resume(resume: str, output_dir: str) -> tuple[Path, str] | None:
    """``auto`` -> OUTPUT_DIR/checkpoints/latest (None if absent); PATH -> a step dir, a checkpoints dir or
    an output dir. Returns (checkpoints root, tag)."""
    if not resume:
        return None
    p = Path(output_dir) / "checkpoints" if resume == "auto" else Path(resume)
    if (p / "checkpoints" / "latest").is_file():
        p = p / "checkpoints"
    if (p / "latest").is_file():
        return p, (p / "latest").read_text().strip()
    if TAG_RE.match(p.name) and p.is_dir():
        return p.parent, p.name
    if resume == "auto":
        return None
    raise FileNotFoundError(f"resume={resume}: neither a checkpoint dir (step-XXXXXXXX) nor a dir with 'latest'")


def _zero_parts(ckpt_dir: Path) -> int:
    """How many data-parallel ranks wrote this checkpoint's ZeRO optimizer slices (0: not a ZeRO-1/2/3 one)."""
    return len({m.group(1) for f in ckpt_dir.glob("*zero_pp_rank_*optim_states.pt")
                if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))})


def universal_dir(ckpt_dir: Path) -> Path:
    """Where :func:`to_universal` puts ``ckpt_dir``'s universal checkpoint: DeepSpeed's load dir for tag
    ``ckpt_dir.name``."""
    return ckpt_dir / "universal"


def to_universal(ckpt_dir: Path) -> None:
    """``ckpt_dir`` (a ZeRO checkpoint, sliced per rank) as DeepSpeed's universal checkpoint, made once in
    ``universal_dir(ckpt_dir)/<tag>``: every parameter whole, in fp32, with its optimizer moments, so it loads on
    any number of ranks."""
    root = universal_dir(ckpt_dir)
    done = root / ckpt_dir.name / "zero"
    if not done.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = ckpt_dir / "universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting %s (written by %d ranks) into a universal checkpoint", ckpt_dir, _zero_parts(ckpt_dir))
        ds_to_universal(Namespace(input_folder=str(ckpt_dir), output_folder=str(tmp / ckpt_dir.name),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True))   # (our checkpoints carry no Megatron layout info)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)


def load_checkpoint(engine, root: Path, tag: str, rank: int) -> dict:
    """Restores module, optimizer and our client state; then this rank's RNG (last, right before training).
    DeepSpeed's loader unpickles with ``weights_only=False``, so every ``*.pt`` of the tag is first proven to
    load with ``weights_only=True`` (:func:`training.merge.refuse_unsafe_torch_files`): a checkpoint someone
    handed you cannot run code on resume.

    Another number of data-parallel ranks than the checkpoint's (a two-node job resumed on one node): DeepSpeed
    cannot re-slice a ZeRO optimizer state, so rank 0 converts the checkpoint once into a universal checkpoint
    (:func:`to_universal`) and every rank loads that; the data position is world-size independent, so training
    goes on where it stopped (the RNG streams of the old ranks are not those of the new ones)."""
    from training.merge import refuse_unsafe_torch_files  # (here: merge imports model, which imports this)

    refuse_unsafe_torch_files(root / tag)
    load_dir = root
    parts = _zero_parts(root / tag)
    if parts and parts != engine.dp_world_size:
        if rank == 0:
            to_universal(root / tag)
        if dist.is_initialized():
            dist.barrier()
        load_dir = universal_dir(root / tag)
        for d in sorted({f.parent for f in load_dir.rglob("*.pt")}):   # (a universal dir may come with the checkpoint)
            refuse_unsafe_torch_files(d)
        engine._config.load_universal_checkpoint = True   # DeepSpeed reads it from its config at load time
    try:
        path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    rng_file = root / tag / f"rng_state_rank{rank}.pt"
    if rng_file.is_file():
        client["_rng"] = torch.load(rng_file, weights_only=True)
    else:
        log.warning("%s missing (world size changed?): RNG continues from the seed, not bit-exact", rng_file)
    return client

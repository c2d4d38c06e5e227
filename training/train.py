"""tunesmith's training engine: continual pretraining (pt) and SFT on packed shards, full or LoRA,
DeepSpeed ZeRO 0-3 (+ CPU offload), exactly resumable.

Launch forms (all read the same typed config; ``key=value`` overrides any field of training/config.py)::

    python training/train.py --config configs/pt_small.yaml                     # one process, no launcher
    deepspeed --num_gpus 8 training/train.py --config configs/pt_llama2_7b.yaml data_dir=...
    deepspeed --hostfile hosts training/train.py --config ... --resume auto      # multi-node
    torchrun --nproc_per_node 2 training/train.py --config ... ds_config=ds_configs/zero3.json

The loop, top to bottom: validate the job (before any model loads) -> init distributed -> ZeRO memory
estimate -> build model -> deepspeed.initialize -> resume -> for each optimizer step: read the step's
micro-batches, count the target tokens of the whole step over all ranks, forward/backward each
micro-batch with loss = sum of token losses / that count, set the lr, step -> log / eval / checkpoint.
Nothing in the loop knows about text: a mode is just a kind of shard.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python training/train.py` and the deepspeed launcher run this as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from data_preprocess.shards import open_split
from training import checkpoint as ckpt
from training.config import (
    ConfigError,
    TrainConfig,
    detect_environment,
    fill_ds_config,
    fused_adam_unavailable,
    load_config,
    offloads,
    validate,
    zero_stage,
)
from training.data import ConcatSplit, make_batch, step_micro_batches, train_stream, val_batches
from training.fused_loss import ChunkedLossHead, chunked_unsupported
from training.metrics import MetricsLogger, format_line, plot_loss_curve, safe_exp
from training.model import DTYPES, build_model, compile_decoder_layers, estimate_memory, memory_fixes, param_groups
from training.oom import host_memory_bytes, is_out_of_memory, out_of_memory_summary
from training.presets import PRESETS
from training.schedule import lr_at

log = logging.getLogger("tunesmith.train")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="tunesmith trainer (DeepSpeed)", epilog="extra key=value pairs "
                                 "override config fields, e.g. lr=1e-4 train_type=lora ds_config=ds_configs/zero3.json")
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


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def all_sum(values: list[float] | torch.Tensor, device) -> list[float]:
    """Sum over ranks of a list of numbers or a (device) tensor; returns Python floats."""
    import torch.distributed as dist

    t = values.to(torch.float64).reshape(-1).clone() if isinstance(values, torch.Tensor) else \
        torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def token_losses(engine, batch, head=None, token_out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of next-token cross-entropies over the batch's targets, logits). Loss in fp32.

    With ``head`` (a :class:`training.fused_loss.ChunkedLossHead`) the loss is computed chunk by chunk from the
    last hidden state and no logits are returned; otherwise from the model's logits, shifting the *labels*
    (position i predicts label i+1), so the logits are never sliced into a non-contiguous copy.
    ``token_out`` (float32, shaped like the labels) receives each position's loss: a mixture's per-source
    losses are its rows' sums."""
    inputs = batch.model_inputs()
    if head is not None:
        return head(engine, batch.labels, token_out=token_out, **inputs), None
    logits = engine(**inputs, use_cache=False).logits
    targets = F.pad(batch.labels, (0, 1), value=-100)[:, 1:]
    flat = logits.float().view(-1, logits.shape[-1])
    if token_out is None:
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum"), logits
    per_token = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="none")
    token_out.view(-1).copy_(per_token.detach())
    return per_token.sum(), logits


def make_loss_head(engine, loss: str, chunk_size: int):
    """The :class:`ChunkedLossHead` for ``loss`` = chunked | auto (None = the HF logits path), with the reason."""
    if loss == "hf":
        return None, "loss=hf"
    why = chunked_unsupported(engine)
    if why is None:
        head = ChunkedLossHead(engine, chunk_size)
        where = " (inside lm_head's forward: ZeRO-3 gathers its weight)" if head.partitioned else ""
        return head, f"chunked cross-entropy, {chunk_size} tokens per chunk{where}"
    if loss == "chunked":
        raise ConfigError(f"loss=chunked cannot run here: {why}. Fix: loss=auto or loss=hf")
    return None, f"HF logits loss ({why})"


@torch.no_grad()
def evaluate(engine, val_splits: dict, cfg: TrainConfig, tok, rank: int, world: int, device, mask_dtype,
             byte_cache: dict, head=None) -> dict:
    """Val loss (nats/target token), perplexity and bits per character (UTF-8 byte of decoded target text)
    over the val split of every source (``val_splits``: {name: split}; ``eval_max_batches`` caps each); with
    several sources also ``val_loss/NAME`` and ``val_bpc/NAME``, the overall figures over all their tokens."""
    engine.eval()
    sums = []
    for name, split in val_splits.items():
        cache = byte_cache.setdefault(name, {})
        loss_sum, n_targets, n_bytes = 0.0, 0, 0
        for rows in val_batches(len(split), cfg.micro_batch_size, rank, world, cfg.eval_max_batches):
            batch = make_batch(split, rows, cfg.batch_attention, mask_dtype, device)
            key = tuple(rows.tolist())
            if key not in cache:  # bytes of the decoded target text: computed once per val batch
                tgt = batch.labels[:, 1:]
                cache[key] = sum(len(tok.decode(r[r != -100].tolist(), skip_special_tokens=True).encode("utf-8"))
                                 for r in tgt)
            ls = token_losses(engine, batch, head)[0]
            loss_sum += ls.item()
            n_targets += batch.num_targets
            n_bytes += cache[key]
        sums += [loss_sum, n_targets, n_bytes]
    engine.train()
    sums = all_sum(sums, device)
    per = {name: sums[3 * i:3 * i + 3] for i, name in enumerate(val_splits)}

    def figures(loss_sum, n_targets, n_bytes):
        return loss_sum / max(n_targets, 1), (loss_sum / math.log(2) / n_bytes) if n_bytes else None

    total = [sum(v[j] for v in per.values()) for j in range(3)]
    loss, bpc = figures(*total)
    out = {"val_loss": loss, "val_ppl": safe_exp(loss), "val_bpc": bpc, "val_tokens": int(total[1])}
    if len(per) > 1:
        for name, v in per.items():
            out[f"val_loss/{name}"], out[f"val_bpc/{name}"] = figures(*v)
    return out


def main(argv=None) -> int:
    """Runs the job; exit status 0 done, 2 bad config, 3 out of memory (one ``error:`` line per rank that ran out,
    with where it happened and what to change, instead of an allocator traceback)."""
    progress = {"at": "before the model was built", "estimate": None, "device": None, "rank": 0, "cfg": None}
    try:
        return run(argv, progress)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        device, est = progress["device"], progress["estimate"] or {}
        peak = (f"; {'peak' if device.type == 'cuda' else 'RSS'} {memory_gb(device):.2f} GiB"
                if device is not None else "")
        need = est.get("device_bytes_total")
        plan = f"; estimated before training: {need / 2**30:,.2f} GiB per device" if need else ""
        print(f"error: rank {progress['rank']} ran out of memory {progress['at']}: {out_of_memory_summary(e)}{peak}"
              f"{plan}. Fix: {memory_fixes(progress['cfg'], est)}", file=sys.stderr, flush=True)
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() == 1:
            dist.destroy_process_group()
        return 3


def run(argv, progress: dict) -> int:
    """The job (see the module docstring); ``progress`` tells :func:`main` where it is, for an out-of-memory
    message."""
    args = parse_args(argv)
    launcher_defaults()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    progress["rank"] = rank
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
    tok, meta, precision = facts["tokenizer"], facts["meta"], facts["precision"]
    progress["cfg"] = cfg

    # ---- 2. distributed ----------------------------------------------------------------------------
    import deepspeed
    import torch.distributed as dist

    if env.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    progress["device"] = device
    try:
        wait_for_master(cfg.rendezvous_timeout_s)
    except ConfigError as e:
        print(f"error: {e}", flush=True)
        return 2
    deepspeed.init_distributed(dist_backend="nccl" if env.device == "cuda" else "gloo")
    seed_all(cfg.seed)

    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    # the data: one source, or a mixture read as one split (training/data.py); val stays per source
    sources = facts["sources"]
    names = [src["name"] for src in sources]
    parts = [open_split(src["dir"], "train", src["meta"]) for src in sources]
    train_split = parts[0] if len(parts) == 1 else ConcatSplit(parts)
    val_splits = {src["name"]: open_split(src["dir"], "val", src["meta"]) for src in sources}
    mixture = len(sources) > 1
    G, L = cfg.global_batch_size, int(meta["max_len"])
    gas = G // (cfg.micro_batch_size * world)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * len(train_split) / G))
    ds = fill_ds_config(facts["ds"], cfg, world, precision, facts["hidden_size"], env.device == "cpu")
    stage = zero_stage(ds)
    lora = cfg.train_type == "lora"
    if env.device == "cuda" and ds.get("optimizer", {}).get("params", {}).get("torch_adam") and rank == 0:
        log.warning("optimizer: torch.optim.AdamW inside DeepSpeed (%s)", fused_adam_unavailable() or "torch_adam set")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_root.mkdir(exist_ok=True)
        job = {"config": cfg.to_dict(), "model_source": facts["model_source"], "ds_config": ds, "world_size": world,
               "precision": precision, "device": env.device, "max_steps": max_steps, "gradient_accumulation_steps": gas,
               "data": {"max_len": L, "train_blocks": len(train_split),
                        "val_blocks": sum(len(v) for v in val_splits.values()),
                        "tokenizer": facts["tokenizer_identity"],
                        "sources": [{k: src[k] for k in ("name", "dir", "train_blocks", "val_blocks", "weight")}
                                    for src in sources]}}
        (out / "job.json").write_text(json.dumps(job, indent=2) + "\n")
        log.info("job: %s %s, %s, ZeRO-%d, %s, world %d, global batch %d = micro %d x gas %d x ranks %d, "
                 "%d steps of %d tokens", cfg.mode, cfg.train_type, cfg.model, stage, precision, world, G,
                 cfg.micro_batch_size, gas, world, max_steps, G * L)
        if mixture:
            log.info("data: a mixture of %d sources: %s", len(sources), ", ".join(
                f"{src['name']} ({src['train_blocks']} blocks, "
                f"{'share ' + format(src['weight'], '.3g') if src['weight'] is not None else 'by size'})"
                for src in sources))

    # ---- 3. memory estimate, model, engine --------------------------------------------------------
    if rank == 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if env.device == "cuda":
            dev_mem = torch.cuda.get_device_properties(device).total_memory
        else:  # CPU ranks share the host's memory
            dev_mem = host_memory_bytes() // max(1, local_world)
        progress["estimate"] = estimate_memory(cfg, tok, stage, *offloads(ds), world, local_world, dev_mem,
                                               seq_len=L, precision=precision, device=env.device)
    progress["at"] = "while building the model and the DeepSpeed engine"
    # an adapter on a random-init preset needs its base: saved once (rank 0) to OUTPUT_DIR/base_model
    base_dir = out / "base_model"
    base_model_dir = (str(base_dir.resolve()) if cfg.model in PRESETS else cfg.model) if lora else None
    # decided on every rank (ZeRO-3 gathers the base for saving, a collective); rank 0 writes it
    save_base = lora and cfg.model in PRESETS and not (base_dir / "config.json").exists()
    model, info = build_model(cfg, tok, precision, save_base_to=base_dir if save_base else None, ds_config=ds,
                              rank=rank)
    if rank == 0:
        log.info("model: %.2f M parameters, %.2f M trainable%s", info.n_params / 1e6, info.n_trainable / 1e6,
                 f" (LoRA r={cfg.lora_r}, modules_to_save={info.modules_to_save}"
                 f"{', tied embeddings ' + info.tied_embeddings if info.tied_embeddings else ''})" if lora else "")
        if stage == 3:
            log.info("ZeRO-3: the model was built inside deepspeed.zero.Init -- each of the %d ranks created and "
                     "keeps 1/%d of every parameter", world, world)
    if cfg.compile:
        n = compile_decoder_layers(model)
        if rank == 0:
            log.info("torch.compile: %d decoder layers (compiled on the first forward)", n)
    groups = param_groups(model, cfg.weight_decay)
    client_opt = None
    if cfg.optimizer == "torch":  # on GPU the fused kernel (a few launches for all parameters) over foreach
        client_opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                       fused=env.device == "cuda" or None)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups if client_opt is None else None,
                                           optimizer=client_opt, config=ds)
    mask_dtype = DTYPES[precision]
    try:
        head, loss_desc = make_loss_head(engine, cfg.loss, cfg.loss_chunk_size)
    except ConfigError as e:
        if rank == 0:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        log.info("loss: %s", loss_desc)
    ck_info = {"model_source": cfg.model, "train_type": cfg.train_type, "mode": cfg.mode,
               "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                        "target_modules": list(cfg.lora_target_modules),
                        "modules_to_save": info.modules_to_save,
                        "tied_embeddings": info.tied_embeddings or None} if lora else None,
               "vocab_size": len(tok), "tokenizer_dir": str(Path(cfg.tokenizer_dir).resolve()),
               "base_model_dir": base_model_dir, "zero_stage": stage, "dtype": precision}

    # ---- 4. resume -------------------------------------------------------------------------------
    step, position = 0, 0
    data_sources = [[src["name"], src["train_blocks"], src["weight"]] for src in sources]
    found = ckpt.find_resume(cfg.resume, cfg.output_dir)
    if found:
        try:
            client = ckpt.load_checkpoint(engine, *found, rank)
        except ConfigError as e:
            if rank == 0:
                print(f"error: {e}", file=sys.stderr)
            return 2
        step, position = int(client["global_step"]), int(client["data_position"])
        if client.get("global_batch_size") != G and rank == 0:
            log.warning("global batch changed %s -> %d since the checkpoint", client.get("global_batch_size"), G)
        if client.get("data_sources", data_sources) != data_sources and rank == 0:
            log.warning("data sources changed since the checkpoint (%s -> %s): the data order from here on is "
                        "the new mixture's", client.get("data_sources"), data_sources)
        if "_rng" in client:
            ckpt.set_rng_state(client["_rng"])
        if rank == 0:
            log.info("resumed from %s/%s at step %d (data position %d)", found[0], found[1], step, position)
    elif cfg.resume == "auto" and rank == 0:
        log.info("resume=auto: no checkpoint in %s, starting fresh", ckpt_root)

    # ---- 5. the loop -----------------------------------------------------------------------------
    metrics = MetricsLogger(out, [r for r in cfg.report_to if r != "none"], cfg.run_name, cfg.wandb_project,
                            cfg.to_dict(), enabled=rank == 0)
    stream = train_stream([src["train_blocks"] for src in sources], cfg.data_weights, cfg.seed)
    byte_cache: dict = {}
    engine.train()
    t_last, tokens_since = time.time(), 0
    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="train", disable=rank != 0 or not sys.stderr.isatty())
    while step < max_steps:
        progress["at"] = f"in training step {step + 1}, micro_batch_size {cfg.micro_batch_size} x {L} tokens"
        micro_rows = step_micro_batches(stream, position, G, cfg.micro_batch_size, rank, world)
        batches = [make_batch(train_split, rows, cfg.batch_attention, mask_dtype, device) for rows in micro_rows]
        # the loss of a step is (sum of token losses over ALL micro-batches and ranks) / (their target count);
        # DeepSpeed averages gradients over ranks, hence the factor `world` (and scale_wrt_gas=False below)
        n_targets = all_sum([sum(b.num_targets for b in batches)], device)[0]
        lr = lr_at(step + 1, max_steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        # a mixture: per-source (loss sum, targets) from each row's token losses, summed with the step's loss
        per_src = torch.zeros(2 * len(sources), dtype=torch.float64, device=device) if mixture else None
        for batch, rows in zip(batches, micro_rows):
            tok_loss = torch.zeros(batch.labels.shape, dtype=torch.float32, device=device) if mixture else None
            ls = token_losses(engine, batch, head, tok_loss)[0]  # no name keeps the logits alive through backward
            engine.backward(ls * (world / max(n_targets, 1.0)), scale_wrt_gas=False)
            engine.step()  # DeepSpeed applies the update (clip, optimizer) at the accumulation boundary only
            loss_sum += ls.detach()  # stays on the device: one host sync per step (the all-reduce below)
            if mixture:
                src = torch.from_numpy(train_split.source_of(rows)).to(device)
                n_row = (batch.labels[:, 1:] != -100).sum(1).double()
                per_src.index_add_(0, src, tok_loss.sum(1).double())
                per_src.index_add_(0, src + len(sources), n_row)
        step += 1
        position += G
        tokens_since += G * L
        sums = all_sum(loss_sum if per_src is None else torch.cat([loss_sum.view(1), per_src]), device)
        loss = sums[0] / max(n_targets, 1.0)
        src_losses = {f"loss/{name}": sums[1 + i] / sums[1 + len(names) + i]
                      for i, name in enumerate(names) if mixture and sums[1 + len(names) + i] > 0}
        bar.update(1)
        if step % cfg.log_every == 0 or step == max_steps or step == 1:
            gn = engine.get_global_grad_norm()
            dt = time.time() - t_last
            rec = {"loss": loss, "lr": lr, "grad_norm": None if gn is None else float(gn),
                   "tokens_per_s": tokens_since / dt, "mem_gb": memory_gb(device), "targets": int(n_targets),
                   **src_losses}
            if rank == 0:
                (print if bar.disable else tqdm.write)(format_line(step, max_steps, rec))
            t_last, tokens_since = time.time(), 0
        else:
            rec = {"loss": loss, "lr": lr, **src_losses}
        metrics.log(rec, step)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == max_steps:
            progress["at"] = f"in the evaluation after step {step}"
            ev = evaluate(engine, val_splits, cfg, tok, rank, world, device, mask_dtype, byte_cache, head)
            metrics.log(ev, step)
            if rank == 0:
                log.info("eval step %d: val_loss %.4f ppl %.2f bpc %s", step, ev["val_loss"], ev["val_ppl"],
                         "n/a" if ev["val_bpc"] is None else f"{ev['val_bpc']:.4f}")
        if (cfg.save_every and step % cfg.save_every == 0) or step == max_steps:
            client = {"global_step": step, "data_position": position, "global_batch_size": G, "seed": cfg.seed,
                      "data_sources": data_sources}
            d = ckpt.save_checkpoint(engine, ckpt_root, step, client, ck_info, tok, lora, base_model_dir,
                                     cfg.keep_last, rank)
            if rank == 0:
                log.info("saved checkpoint %s", d)
        ckpt.maybe_fault(step, "after_step")
    bar.close()

    # ---- 6. the end: final export, optional export check, curve ------------------------------------
    final_hf = ckpt_root / ckpt.tag_of(step) / "hf"
    if rank == 0 and final_hf.is_dir():
        import shutil

        shutil.rmtree(out / "final", ignore_errors=True)
        shutil.copytree(final_hf, out / "final")
    if cfg.verify_export:
        diff = verify_export(engine, next(iter(val_splits.values())), cfg, out / "final", base_model_dir, lora, rank, device, mask_dtype)
        metrics.log({"export_max_abs_logit_diff": diff}, step)
    if rank == 0:
        png = plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png", f"{cfg.mode} {cfg.train_type} {cfg.model}")
        log.info("done: %d steps; loss curve %s; HF export %s", step, png, out / "final")
    metrics.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def verify_export(engine, val_split, cfg: TrainConfig, export_dir: Path, base_model_dir, lora: bool, rank: int,
                  device, mask_dtype) -> float | None:
    """Reloads the HF export with plain transformers (+ peft) and compares its logits with the engine's on
    one val batch (all ranks run the engine forward; ZeRO-3 needs them). Raises if they disagree."""
    import torch.distributed as dist

    rows = np.arange(min(cfg.micro_batch_size, len(val_split)))
    batch = make_batch(val_split, rows, cfg.batch_attention, mask_dtype)
    # plain transformers loads the export with its own attention: the same documents as a 4D mask for varlen
    hf_batch = make_batch(val_split, rows, cfg.doc_attention, mask_dtype) if cfg.attn_implementation == "varlen" else batch
    engine.eval()
    with torch.no_grad():
        _, ref = token_losses(engine, batch.to(device))
    engine.train()
    diff = None
    if rank == 0:
        from transformers import AutoModelForCausalLM

        if lora:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=ref.dtype)
            from transformers import AutoTokenizer

            n_tok = len(AutoTokenizer.from_pretrained(str(export_dir)))
            if n_tok > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(n_tok, mean_resizing=False)
            model = PeftModel.from_pretrained(base, str(export_dir))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=ref.dtype)
        model.to(device).eval()
        with torch.no_grad():
            got = model(**hf_batch.to(device).model_inputs()).logits
        diff = (got.float() - ref.float()).abs().max().item()
        tol = 1e-3 if ref.dtype == torch.float32 else 5e-2
        log.info("export check: max |logit(HF export) - logit(engine)| = %.3g (tolerance %g)", diff, tol)
        if not diff <= tol:
            raise RuntimeError(f"HF export {export_dir} disagrees with the engine: max logit diff {diff:.3g} > {tol}")
    dist.barrier()
    return diff


if __name__ == "__main__":
    raise SystemExit(main())

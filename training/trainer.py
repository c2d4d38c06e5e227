"""The training recipe as one small class: :meth:`Trainer.setup` builds the job, :meth:`Trainer.train`
runs it, one :meth:`Trainer.train_step` per optimizer step, with :meth:`evaluate`, :meth:`save` and
:meth:`export` around it. ``training/train.py`` is its command line; ``benchmarks/train_throughput.py``
times this same ``train_step`` (it builds its engine with :meth:`build_engine` on its own model and data).

The loss of a step, in one place (:meth:`train_step`): the sum of next-token cross-entropies over ALL the
step's micro-batches on ALL ranks, divided by their target count -- so a sequence's weight does not depend
on how the batch was split. DeepSpeed averages gradients over ranks, hence the factor ``world`` in the
backward and ``scale_wrt_gas=False``. The learning rate: :func:`training.schedule.lr_at`.

Hooks: ``Trainer(hooks=[f])`` calls ``f(event, step)`` at ``after_step`` (a step done, its checkpoint
written) and ``mid_save`` (a checkpoint's DeepSpeed files written, its HF export not yet). Tests install a
hook that SIGKILLs the process there (tests/fault_train.py); nothing in the loop reads the environment.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_preprocess.shards import open_split
from training import checkpoint as ckpt
from training.config import ConfigError, TrainConfig, fill_ds_config, fused_adam_unavailable, offloads, zero_stage
from training.data import ConcatSplit, make_batch, step_micro_batches, train_stream, val_batches
from training.fused_loss import ChunkedLossHead, chunked_unsupported
from training.metrics import MetricsLogger, format_line, plot_loss_curve, safe_exp
from training.model import DTYPES, build_model, compile_decoder_layers, estimate_memory, param_groups
from training.oom import host_memory_bytes
from training.presets import PRESETS
from training.schedule import lr_at

log = logging.getLogger("tunesmith.train")

Hook = Callable[[str, int], None]


@dataclass
class Progress:
    """Where the job is, for ``main``'s out-of-memory message (one line instead of an allocator traceback)."""

    at: str = "before the model was built"
    """what the job was doing, e.g. 'in training step 7, micro_batch_size 4 x 2048 tokens'"""
    estimate: dict | None = None
    """training.model.estimate_memory's result (rank 0), to set the need against the device"""
    device: torch.device | None = None
    """this rank's device, once chosen"""
    rank: int = 0
    """this process's global rank"""
    cfg: TrainConfig | None = None
    """the validated job, once loaded (memory_fixes reads it)"""


@dataclass
class StepResult:
    """What one optimizer step measured (all ranks agree on every figure)."""

    loss: float
    """sum of token losses over the step's micro-batches and ranks / their target count"""
    lr: float
    """the learning rate the step used"""
    n_targets: float
    """target tokens of the whole step over all ranks"""
    source_losses: dict[str, float] = field(default_factory=dict)
    """a mixture: ``loss/NAME`` per source (the same division over that source's rows)"""


def memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil  # a dependency of deepspeed; only the CPU path reads it

    return psutil.Process().memory_info().rss / 2**30


def all_sum(values: list[float] | torch.Tensor, device) -> list[float]:
    """Sum over ranks of a list of numbers or a (device) tensor; returns Python floats."""
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


class Trainer:
    """One training job on one rank. ``setup`` -> ``resume`` -> ``train`` (which calls ``train_step``,
    ``evaluate`` and ``save``) -> ``export``; the benchmark uses ``build_engine`` + ``train_step`` alone."""

    def __init__(self, cfg: TrainConfig, device: torch.device, precision: str, rank: int = 0, world: int = 1,
                 hooks: list[Hook] | tuple = (), progress: Progress | None = None):
        self.cfg, self.device, self.precision, self.rank, self.world = cfg, device, precision, rank, world
        self.hooks = list(hooks)
        self.progress = progress or Progress(rank=rank, device=device, cfg=cfg)
        self.mask_dtype = DTYPES[precision]
        self.source_names: list[str] = []  # a mixture's sources, in shard order (train_step's per-source losses)

    def _event(self, event: str, step: int) -> None:
        for hook in self.hooks:
            hook(event, step)

    # ---- setup -------------------------------------------------------------------------------------
    def build_engine(self, model, ds: dict) -> None:
        """``deepspeed.initialize`` on ``model`` with the filled ``ds`` config and the job's optimizer, then the
        loss head (raises ConfigError when ``loss=chunked`` cannot run)."""
        import deepspeed

        cfg = self.cfg
        if cfg.compile:
            n = compile_decoder_layers(model)
            if self.rank == 0:
                log.info("torch.compile: %d decoder layers (compiled on the first forward)", n)
        groups = param_groups(model, cfg.weight_decay)
        client_opt = None
        if cfg.optimizer == "torch":  # on GPU the fused kernel (a few launches for all parameters) over foreach
            client_opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, fused=self.device.type == "cuda" or None)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups if client_opt is None
                                                    else None, optimizer=client_opt, config=ds)
        self.head, self.loss_desc = make_loss_head(self.engine, cfg.loss, cfg.loss_chunk_size)
        if self.rank == 0:
            log.info("loss: %s", self.loss_desc)

    def setup(self, facts: dict, env) -> None:
        """Everything before the loop, from the validated job (``facts`` = training.config.validate's result):
        the data, the filled DeepSpeed config, job.json, the memory estimate, the model and the engine."""
        cfg, rank, world = self.cfg, self.rank, self.world
        self.tok, meta = facts["tokenizer"], facts["meta"]
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        # the data: one source, or a mixture read as one split (training/data.py); val stays per source
        self.sources = facts["sources"]
        parts = [open_split(src["dir"], "train", src["meta"]) for src in self.sources]
        self.train_split = parts[0] if len(parts) == 1 else ConcatSplit(parts)
        self.val_splits = {src["name"]: open_split(src["dir"], "val", src["meta"]) for src in self.sources}
        if len(self.sources) > 1:
            self.source_names = [src["name"] for src in self.sources]
        self.data_sources = [[src["name"], src["train_blocks"], src["weight"]] for src in self.sources]
        G, L = cfg.global_batch_size, int(meta["max_len"])
        self.seq_len = L
        gas = G // (cfg.micro_batch_size * world)
        self.max_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * len(self.train_split) / G))
        ds = fill_ds_config(facts["ds"], cfg, world, self.precision, facts["hidden_size"], env.device == "cpu")
        stage = zero_stage(ds)
        self.lora = cfg.train_type == "lora"
        if env.device == "cuda" and ds.get("optimizer", {}).get("params", {}).get("torch_adam") and rank == 0:
            log.warning("optimizer: torch.optim.AdamW inside DeepSpeed (%s)",
                        fused_adam_unavailable() or "torch_adam set")
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(exist_ok=True)
            job = {"config": cfg.to_dict(), "model_source": facts["model_source"], "ds_config": ds,
                   "world_size": world, "precision": self.precision, "device": env.device,
                   "max_steps": self.max_steps, "gradient_accumulation_steps": gas,
                   "data": {"max_len": L, "train_blocks": len(self.train_split),
                            "val_blocks": sum(len(v) for v in self.val_splits.values()),
                            "tokenizer": facts["tokenizer_identity"],
                            "sources": [{k: src[k] for k in ("name", "dir", "train_blocks", "val_blocks", "weight")}
                                        for src in self.sources]}}
            (self.out / "job.json").write_text(json.dumps(job, indent=2) + "\n")
            log.info("job: %s %s, %s, ZeRO-%d, %s, world %d, global batch %d = micro %d x gas %d x ranks %d, "
                     "%d steps of %d tokens", cfg.mode, cfg.train_type, cfg.model, stage, self.precision, world, G,
                     cfg.micro_batch_size, gas, world, self.max_steps, G * L)
            if self.source_names:
                log.info("data: a mixture of %d sources: %s", len(self.sources), ", ".join(
                    f"{src['name']} ({src['train_blocks']} blocks, "
                    f"{'share ' + format(src['weight'], '.3g') if src['weight'] is not None else 'by size'})"
                    for src in self.sources))

        # the memory estimate (rank 0), then the model and the engine
        if rank == 0:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            if env.device == "cuda":
                dev_mem = torch.cuda.get_device_properties(self.device).total_memory
            else:  # CPU ranks share the host's memory
                dev_mem = host_memory_bytes() // max(1, local_world)
            self.progress.estimate = estimate_memory(cfg, self.tok, stage, *offloads(ds), world, local_world,
                                                     dev_mem, seq_len=L, precision=self.precision, device=env.device)
        self.progress.at = "while building the model and the DeepSpeed engine"
        # an adapter on a random-init preset needs its base: saved once (rank 0) to OUTPUT_DIR/base_model
        base_dir = self.out / "base_model"
        self.base_model_dir = (str(base_dir.resolve()) if cfg.model in PRESETS else cfg.model) if self.lora else None
        # decided on every rank (ZeRO-3 gathers the base for saving, a collective); rank 0 writes it
        save_base = self.lora and cfg.model in PRESETS and not (base_dir / "config.json").exists()
        model, info = build_model(cfg, self.tok, self.precision, save_base_to=base_dir if save_base else None,
                                  ds_config=ds, rank=rank)
        if rank == 0:
            log.info("model: %.2f M parameters, %.2f M trainable%s", info.n_params / 1e6, info.n_trainable / 1e6,
                     f" (LoRA r={cfg.lora_r}, modules_to_save={info.modules_to_save}"
                     f"{', tied embeddings ' + info.tied_embeddings if info.tied_embeddings else ''})"
                     if self.lora else "")
            if stage == 3:
                log.info("ZeRO-3: the model was built inside deepspeed.zero.Init -- each of the %d ranks created "
                         "and keeps 1/%d of every parameter", world, world)
        self.build_engine(model, ds)
        self.ck_info = {"model_source": cfg.model, "train_type": cfg.train_type, "mode": cfg.mode,
                        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                                 "target_modules": list(cfg.lora_target_modules),
                                 "modules_to_save": info.modules_to_save,
                                 "tied_embeddings": info.tied_embeddings or None} if self.lora else None,
                        "vocab_size": len(self.tok), "tokenizer_dir": str(Path(cfg.tokenizer_dir).resolve()),
                        "base_model_dir": self.base_model_dir, "zero_stage": stage, "dtype": self.precision}

    def resume(self) -> tuple[int, int]:
        """(step, data position) to start from: a checkpoint's (``resume`` = auto / a path) or (0, 0)."""
        cfg, rank = self.cfg, self.rank
        found = ckpt.find_resume(cfg.resume, cfg.output_dir)
        if not found:
            if cfg.resume == "auto" and rank == 0:
                log.info("resume=auto: no checkpoint in %s, starting fresh", self.ckpt_root)
            return 0, 0
        client = ckpt.load_checkpoint(self.engine, *found, rank)
        step, position = int(client["global_step"]), int(client["data_position"])
        if client.get("global_batch_size") != cfg.global_batch_size and rank == 0:
            log.warning("global batch changed %s -> %d since the checkpoint", client.get("global_batch_size"),
                        cfg.global_batch_size)
        if client.get("data_sources", self.data_sources) != self.data_sources and rank == 0:
            log.warning("data sources changed since the checkpoint (%s -> %s): the data order from here on is "
                        "the new mixture's", client.get("data_sources"), self.data_sources)
        if "_rng" in client:
            ckpt.set_rng_state(client["_rng"])
        if rank == 0:
            log.info("resumed from %s/%s at step %d (data position %d)", found[0], found[1], step, position)
        return step, position

    # ---- the step ----------------------------------------------------------------------------------
    def train_step(self, micro_rows: list[np.ndarray], lr: float,
                   on_phase: Callable[[str], None] | None = None) -> StepResult:
        """One optimizer step over this rank's ``micro_rows`` (block indices of ``self.train_split``, one array
        per micro-batch). ``on_phase(name)`` is called after each phase -- ``data``, then per micro-batch
        ``forward``, ``backward``, ``optimizer`` -- for the throughput benchmark's breakdown."""
        engine, device, world = self.engine, self.device, self.world
        mark = on_phase or (lambda name: None)
        batches = [make_batch(self.train_split, rows, self.cfg.batch_attention, self.mask_dtype, device)
                   for rows in micro_rows]
        mark("data")
        # the loss of a step is (sum of token losses over ALL micro-batches and ranks) / (their target count);
        # DeepSpeed averages gradients over ranks, hence the factor `world` (and scale_wrt_gas=False below)
        n_targets = all_sum([sum(b.num_targets for b in batches)], device)[0]
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
        names = self.source_names
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        # a mixture: per-source (loss sum, targets) from each row's token losses, summed with the step's loss
        per_src = torch.zeros(2 * len(names), dtype=torch.float64, device=device) if names else None
        for batch, rows in zip(batches, micro_rows):
            tok_loss = torch.zeros(batch.labels.shape, dtype=torch.float32, device=device) if names else None
            ls = token_losses(engine, batch, self.head, tok_loss)[0]  # no name keeps the logits alive in backward
            mark("forward")
            engine.backward(ls * (world / max(n_targets, 1.0)), scale_wrt_gas=False)
            mark("backward")
            engine.step()  # DeepSpeed applies the update (clip, optimizer) at the accumulation boundary only
            mark("optimizer")
            loss_sum += ls.detach()  # stays on the device: one host sync per step (the all-reduce below)
            if names:
                src = torch.from_numpy(self.train_split.source_of(rows)).to(device)
                n_row = (batch.labels[:, 1:] != -100).sum(1).double()
                per_src.index_add_(0, src, tok_loss.sum(1).double())
                per_src.index_add_(0, src + len(names), n_row)
        sums = all_sum(loss_sum if per_src is None else torch.cat([loss_sum.view(1), per_src]), device)
        src_losses = {f"loss/{name}": sums[1 + i] / sums[1 + len(names) + i]
                      for i, name in enumerate(names) if sums[1 + len(names) + i] > 0}
        return StepResult(sums[0] / max(n_targets, 1.0), lr, n_targets, src_losses)

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self, step: int, position: int) -> int:
        """Optimizer steps from ``step`` (data ``position``) to ``max_steps``, with logging, evaluation and
        checkpoints; returns the last step."""
        from tqdm import tqdm  # a transformers dependency; the bar only shows on a terminal

        cfg, rank, device = self.cfg, self.rank, self.device
        G, L, max_steps = cfg.global_batch_size, self.seq_len, self.max_steps
        self.metrics = MetricsLogger(self.out, [r for r in cfg.report_to if r != "none"], cfg.run_name,
                                     cfg.wandb_project, cfg.to_dict(), enabled=rank == 0)
        stream = train_stream([src["train_blocks"] for src in self.sources], cfg.data_weights, cfg.seed)
        self.byte_cache: dict = {}
        self.engine.train()
        t_last, tokens_since = time.time(), 0
        bar = tqdm(total=max_steps, initial=step, desc="train", disable=rank != 0 or not sys.stderr.isatty())
        while step < max_steps:
            self.progress.at = f"in training step {step + 1}, micro_batch_size {cfg.micro_batch_size} x {L} tokens"
            micro_rows = step_micro_batches(stream, position, G, cfg.micro_batch_size, rank, self.world)
            res = self.train_step(micro_rows, lr_at(step + 1, max_steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio))
            step += 1
            position += G
            tokens_since += G * L
            bar.update(1)
            rec = {"loss": res.loss, "lr": res.lr}
            if step % cfg.log_every == 0 or step == max_steps or step == 1:
                gn = self.engine.get_global_grad_norm()
                dt = time.time() - t_last
                rec.update(grad_norm=None if gn is None else float(gn), tokens_per_s=tokens_since / dt,
                           mem_gb=memory_gb(device), targets=int(res.n_targets))
                if rank == 0:
                    (print if bar.disable else tqdm.write)(format_line(step, max_steps, {**rec, **res.source_losses}))
                t_last, tokens_since = time.time(), 0
            self.metrics.log({**rec, **res.source_losses}, step)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == max_steps:
                self.progress.at = f"in the evaluation after step {step}"
                ev = self.evaluate()
                self.metrics.log(ev, step)
                if rank == 0:
                    log.info("eval step %d: val_loss %.4f ppl %.2f bpc %s", step, ev["val_loss"], ev["val_ppl"],
                             "n/a" if ev["val_bpc"] is None else f"{ev['val_bpc']:.4f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step == max_steps:
                d = self.save(step, position)
                if rank == 0:
                    log.info("saved checkpoint %s", d)
            self._event("after_step", step)
        bar.close()
        return step

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Val loss (nats/target token), perplexity and bits per character (UTF-8 byte of decoded target text)
        over the val split of every source (``eval_max_batches`` caps each); with several sources also
        ``val_loss/NAME`` and ``val_bpc/NAME``, the overall figures over all their tokens."""
        cfg, engine, device = self.cfg, self.engine, self.device
        engine.eval()
        sums = []
        for name, split in self.val_splits.items():
            cache = self.byte_cache.setdefault(name, {})
            loss_sum, n_targets, n_bytes = 0.0, 0, 0
            for rows in val_batches(len(split), cfg.micro_batch_size, self.rank, self.world, cfg.eval_max_batches):
                batch = make_batch(split, rows, cfg.batch_attention, self.mask_dtype, device)
                key = tuple(rows.tolist())
                if key not in cache:  # bytes of the decoded target text: computed once per val batch
                    tgt = batch.labels[:, 1:]
                    cache[key] = sum(len(self.tok.decode(r[r != -100].tolist(), skip_special_tokens=True)
                                         .encode("utf-8")) for r in tgt)
                ls = token_losses(engine, batch, self.head)[0]
                loss_sum += ls.item()
                n_targets += batch.num_targets
                n_bytes += cache[key]
            sums += [loss_sum, n_targets, n_bytes]
        engine.train()
        sums = all_sum(sums, device)
        per = {name: sums[3 * i:3 * i + 3] for i, name in enumerate(self.val_splits)}

        def figures(loss_sum, n_targets, n_bytes):
            return loss_sum / max(n_targets, 1), (loss_sum / math.log(2) / n_bytes) if n_bytes else None

        total = [sum(v[j] for v in per.values()) for j in range(3)]
        loss, bpc = figures(*total)
        out = {"val_loss": loss, "val_ppl": safe_exp(loss), "val_bpc": bpc, "val_tokens": int(total[1])}
        if len(per) > 1:
            for name, v in per.items():
                out[f"val_loss/{name}"], out[f"val_bpc/{name}"] = figures(*v)
        return out

    def save(self, step: int, position: int) -> Path:
        """A complete, resumable checkpoint of ``step`` (collective: every rank calls it)."""
        client = {"global_step": step, "data_position": position, "global_batch_size": self.cfg.global_batch_size,
                  "seed": self.cfg.seed, "data_sources": self.data_sources}
        return ckpt.save_checkpoint(self.engine, self.ckpt_root, step, client, self.ck_info, self.tok, self.lora,
                                    self.base_model_dir, self.cfg.keep_last, self.rank,
                                    mid_save=lambda: self._event("mid_save", step))

    # ---- the end -----------------------------------------------------------------------------------
    def export(self, step: int) -> None:
        """OUTPUT_DIR/final = the last checkpoint's HF export; with ``verify_export`` its logits are checked
        against the engine's; the loss curve PNG. Ends the process group."""
        cfg = self.cfg
        final_hf = self.ckpt_root / ckpt.tag_of(step) / "hf"
        if self.rank == 0 and final_hf.is_dir():
            shutil.rmtree(self.out / "final", ignore_errors=True)
            shutil.copytree(final_hf, self.out / "final")
        if cfg.verify_export:
            diff = self.verify_export(self.out / "final")
            self.metrics.log({"export_max_abs_logit_diff": diff}, step)
        if self.rank == 0:
            png = plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png",
                                  f"{cfg.mode} {cfg.train_type} {cfg.model}")
            log.info("done: %d steps; loss curve %s; HF export %s", step, png, self.out / "final")
        self.metrics.close()
        dist.barrier()
        dist.destroy_process_group()

    def verify_export(self, export_dir: Path) -> float | None:
        """Reloads the HF export with plain transformers (+ peft) and compares its logits with the engine's on
        one val batch (all ranks run the engine forward; ZeRO-3 needs them). Raises if they disagree."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg, device = self.cfg, self.device
        val_split = next(iter(self.val_splits.values()))
        rows = np.arange(min(cfg.micro_batch_size, len(val_split)))
        batch = make_batch(val_split, rows, cfg.batch_attention, self.mask_dtype)
        # plain transformers loads the export with its own attention: the same documents as a 4D mask for varlen
        hf_batch = (make_batch(val_split, rows, cfg.doc_attention, self.mask_dtype)
                    if cfg.attn_implementation == "varlen" else batch)
        self.engine.eval()
        with torch.no_grad():
            _, ref = token_losses(self.engine, batch.to(device))
        self.engine.train()
        diff = None
        if self.rank == 0:
            if self.lora:
                from peft import PeftModel  # only LoRA exports need peft

                base = AutoModelForCausalLM.from_pretrained(self.base_model_dir, dtype=ref.dtype)
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

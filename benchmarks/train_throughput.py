"""Training throughput: tokens/s/device, MFU, peak memory and a step-time breakdown of tunesmith's
DeepSpeed engine, optionally against ``transformers.Trainer`` on the same job.

    python -m benchmarks.train_throughput --model llama-tiny --train_type full --seq_len 256 --micro_batch_size 4 \\
        --ds_config ds_configs/zero2.json --steps 10 --compare hf_trainer          # CPU, seconds
    python -m benchmarks.train_throughput --model llama2-7b --train_type lora --seq_len 2048 --micro_batch_size 4 \\
        --ds_config ds_configs/zero2.json --steps 20 --compare hf_trainer          # one H100

Every training setting is the training job's own field (training.config.TrainConfig, embedded as ``train``):
``--micro_batch_size``, ``--global_batch_size`` (default: = micro, no accumulation), ``--ds_config``,
``--lora_r``, ``--loss``, ... or ``key=value``, checked by the training job's validators, and the step timed is
:meth:`training.trainer.Trainer.train_step`.

What runs (each runner in its own subprocess, so memory peaks and compile/allocator state never leak):

``tunesmith``   the engine's own code -- ``training.config`` (ds_config "auto" filling),
                ``training.model.build_model`` (preset random init, PEFT LoRA with modules_to_save,
                gradient checkpointing), then ``training.trainer.Trainer``'s ``build_engine`` (optimizer,
                ``deepspeed.initialize``, loss head) and the very ``train_step`` training runs, timed at
                its four phases through its ``on_phase`` hook (data -> forward -> backward -> optimizer
                step; CUDA synchronised at each). With the chunked loss (the default) "forward"
                includes the loss's own gradient work (d hidden and d lm_head weight, chunk by chunk), so
                forward is larger and backward smaller than with ``--loss hf``; the step total compares.
``hf_trainer``  the same model (same builder, seed, LoRA config), the same blocks, sequence length,
                micro batch and the *same filled DeepSpeed config dict* through ``transformers.Trainer``
                (``TrainingArguments(deepspeed=...)``), timed per step by a ``TrainerCallback``.

Data: ``--data_dir`` (a ``data_preprocess`` output: real packed ABC shards and their tokenizer) or, by
default, synthetic packed blocks: documents of random length (mean ``seq_len/4``) of uniform random
token ids over a ``--vocab_size`` vocabulary, positions reset per document -- the same layout
``data_preprocess`` writes. Throughput does not depend on token values.

Figures: tokens/s/device = ``global_batch_size * seq_len`` per step / *median* step time over the timed steps
(the first ``--warmup`` steps are excluded; the median resists other processes' bursts on a shared
machine, the mean is in the JSON too). With ``--rounds R`` the runners alternate R times and each
runner's best round is reported (all rounds in the JSON). The step-time breakdown is a per-phase mean.
tokens/CPU-s divides by the runner process's CPU time (all threads) per step: on a CPU shared with other
jobs it is far steadier than wall time. MFU by :mod:`benchmarks.flops` (model FLOPs: 6N + causal attention
-- with ``--doc_attention block`` over each packed document's own tokens only -- for full, the honest LoRA
count for LoRA); HFU adds the recompute of gradient checkpointing.
Peak memory: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS of the runner process on CPU.
JSON goes to ``--output``; a markdown table is printed.
Does not fit: a runner whose allocation fails (CUDA out of memory, e.g. under ``--memory_gb 23``; the host
allocator on CPU) is a verdict, not a crash: the JSON says ``"fits": false`` with where it ran out (memory
estimate / engine build / step N) and the peak, one line per runner is printed, and the command exits 3.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks.common import (
    default_output,
    environment,
    markdown_table,
    parse_config,
    write_json,
)
from benchmarks.flops import Shape, device_peak, document_attention_span, train_flops_per_token
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from data_preprocess.model_source import resolve_source
from data_preprocess.shards import Split, open_split, read_meta
from training.config import (
    TrainConfig,
    check_choices,
    check_deepspeed,
    check_lora,
    check_optimization,
    check_precision,
    detect_environment,
    fill_ds_config,
    offloads,
    read_ds_config,
    resolve_precision,
    zero_stage,
)
from training.data import BlockStream, make_batch
from training.hf_io import ModelPathError, resolve_model_path
from training.model import DTYPES, build_model, estimate_memory
from training.oom import host_memory_bytes, is_out_of_memory, out_of_memory_summary
from training.presets import is_preset
from training.trainer import Trainer


def bench_job() -> TrainConfig:
    """The training job the benchmark times unless told otherwise: TrainConfig's defaults, except LoRA, one
    micro-batch per step (global_batch_size follows micro_batch_size unless given), no LoRA dropout (as every
    figure since the first; give lora_dropout=0.1 to time ChatMusician's recipe), no trackers, seed 0."""
    return TrainConfig(train_type="lora", global_batch_size=4, micro_batch_size=4, lora_dropout=0.0, report_to=[],
                       seed=0, lr=1e-4)


@dataclass
class ThroughputConfig:
    """The benchmark's own settings; every training setting is a field of the embedded ``train``
    (training.config.TrainConfig -- ``--micro_batch_size``, ``--ds_config``, ``lora_r=16`` ... on the same
    command line), checked by the training job's own validators."""

    train: TrainConfig = field(default_factory=bench_job)
    """the training job timed: any TrainConfig field, as a flag or key=value (data_dir: at most one shard dir;
    none = synthetic blocks)"""
    seq_len: int = 512
    """tokens per packed block (with data_dir: must equal its max_len)"""
    steps: int = 10
    """timed optimizer steps"""
    warmup: int = 2
    """untimed steps first (allocator, autotuning, compile)"""
    compare: str = ""
    """'hf_trainer' to also run transformers.Trainer on the same job"""
    rounds: int = 1
    """runs of each runner, alternating (A B A B ...); the best round is reported -- use 2-3 on a shared machine"""
    memory_gb: float = 0.0
    """GPU only: cap the runner's CUDA memory at this many GiB, whatever the card (24 = does the job fit a 24 GB
    GPU?); the fraction is computed from the card's size"""
    memory_fraction: float = 0.0
    """GPU only: cap the runner's CUDA memory to this fraction of the card (e.g. 0.3 of 80 GB = 24 GB) to test
    whether a job fits a smaller GPU"""
    vocab_size: int = 32000
    """vocabulary of synthetic data / preset (ignored with data_dir)"""
    output: str | None = None
    """JSON path (default outputs/benchmarks/train_throughput_<model>_<type>.json)"""

    def fill_embedded(self, given: set[str]) -> None:
        """After parsing: global_batch_size follows micro_batch_size unless it was given itself."""
        if "global_batch_size" not in given:
            self.train.global_batch_size = self.train.micro_batch_size

    @property
    def gas(self) -> int:
        return max(1, self.train.global_batch_size // self.train.micro_batch_size)

    def validate(self):
        t = self.train
        if self.compare not in ("", "hf_trainer"):
            raise ArgumentError(f"--compare must be '' or 'hf_trainer', got {self.compare!r}")
        if not 0.0 <= self.memory_fraction <= 1.0:
            raise ArgumentError(f"--memory_fraction must be in [0, 1] (0 = no cap), got {self.memory_fraction}")
        if self.memory_gb < 0:
            raise ArgumentError(f"--memory_gb must be >= 0 (0 = no cap), got {self.memory_gb}")
        if self.memory_gb and self.memory_fraction:
            raise ArgumentError("give --memory_gb or --memory_fraction, not both")
        if self.memory_fraction or self.memory_gb:
            import torch

            if not torch.cuda.is_available():
                raise ArgumentError("--memory_gb / --memory_fraction cap CUDA memory; this machine has no GPU")
        for name in ("seq_len", "steps", "rounds"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name} must be >= 1")
        if self.warmup < 0:
            raise ArgumentError("--warmup must be >= 0")
        if len(t.data_dir) > 1:
            raise ArgumentError(f"data_dir: the benchmark reads one shard dir, got {len(t.data_dir)}. Fix: give one")
        if t.data_dir and not (Path(t.data_dir[0]) / "meta.json").is_file():
            raise ArgumentError(f"data_dir {t.data_dir[0]}: no meta.json; make it with python -m data_preprocess.preprocess")
        # the training job's own rules (training/config.py), before any runner process starts, on one rank
        env = detect_environment()
        env = replace(env, world_size=1)
        check_choices(t)
        check_optimization(t, env)
        check_lora(t)
        check_precision(t, env)
        try:
            check_deepspeed(t)
            if not is_preset(t.model):
                resolve_model_path(t.model)
        except ModelPathError as e:
            raise ArgumentError(f"error: {e}") from None

    def output_path(self) -> str:
        return self.output or str(default_output("train_throughput", self.train.model, extra=f"_{self.train.train_type}"))

    def runners(self) -> list[str]:
        return ["tunesmith"] + ([self.compare] if self.compare else [])

    @staticmethod
    def from_dict(d: dict) -> ThroughputConfig:
        """The inverse of ``asdict`` (a runner process reads its config from JSON)."""
        return ThroughputConfig(**{**d, "train": TrainConfig(**d["train"])})


# ------------------------------------------------------------------------------------------------ data


class SyntheticVocab:
    """The few tokenizer facts a random-init preset needs (its size and special ids) when the benchmark
    runs on synthetic token ids; a real tokenizer is used with ``--data_dir``."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def synthetic_split(n_blocks: int, seq_len: int, vocab: int, seed: int):
    """``n_blocks`` packed blocks in the shard layout: BOS doc EOS back to back, positions reset per doc."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, size=(n_blocks, seq_len), dtype=np.int64)
    pos = np.zeros((n_blocks, seq_len), dtype=np.int64)
    for b in range(n_blocks):
        i = 0
        while i < seq_len:
            n = int(min(seq_len - i, max(8, rng.exponential(seq_len / 4))))
            tokens[b, i] = 1
            tokens[b, i + n - 1] = 2
            pos[b, i:i + n] = np.arange(n)
            i += n
    return Split(tokens, np.ones_like(tokens, dtype=np.uint8), pos)


def load_data(cfg: ThroughputConfig, n_blocks: int):
    """(split, tokenizer-or-vocab) of the job: its data_dir's train split, or synthetic blocks."""
    if cfg.train.data_dir:
        from transformers import AutoTokenizer

        d = cfg.train.data_dir[0]
        meta = read_meta(d)
        if meta["max_len"] != cfg.seq_len:
            raise ArgumentError(f"data_dir {d} has max_len {meta['max_len']}, not --seq_len {cfg.seq_len}")
        tok = AutoTokenizer.from_pretrained(str(Path(d) / "tokenizer"))
        return open_split(d, "train", meta), tok
    return synthetic_split(n_blocks, cfg.seq_len, cfg.vocab_size, cfg.train.seed), SyntheticVocab(cfg.vocab_size)


def step_rows(n_blocks: int, steps: int, micro: int, gas: int, seed: int) -> list[list]:
    """Block indices of every step (``gas`` micro-batches of ``micro`` blocks), identical for both runners
    (the engine's shuffled stream)."""
    stream = BlockStream(n_blocks, seed)
    return [[stream.take((s * gas + g) * micro, micro) for g in range(gas)] for s in range(steps)]


# --------------------------------------------------------------------------------------------- runners

# where the runner of this process is, for the "does not fit" record when an allocation fails (see worker)
_PROGRESS: dict = {"at": "while building the model", "memory_estimate_gb": None}


def memory_cap_fraction(cfg: ThroughputConfig, total_bytes: int) -> float:
    """The per-process CUDA memory fraction of ``--memory_gb`` (GiB, on a card of ``total_bytes``) or
    ``--memory_fraction``; 0.0 = no cap."""
    if cfg.memory_gb:
        return min(1.0, cfg.memory_gb * 2**30 / total_bytes)
    return cfg.memory_fraction


def _setup(cfg: ThroughputConfig):
    """Everything both runners share: device, typed engine config, filled ds config, model, data."""
    import torch

    env = detect_environment()
    if env.device == "cuda" and (cfg.memory_fraction or cfg.memory_gb):
        torch.cuda.set_per_process_memory_fraction(memory_cap_fraction(cfg, torch.cuda.get_device_properties(0).total_memory), 0)
    # smollm2-135m / X.gguf: its imported dir (imported by validate()'s resolve_model_path; a cache hit here)
    tcfg = replace(cfg.train, mode="pt", model=resolve_source(cfg.train.model))
    precision = resolve_precision(tcfg, env)
    n_blocks = max(64, tcfg.global_batch_size * (cfg.steps + cfg.warmup))
    split, tok = load_data(cfg, n_blocks)
    model, info = build_model(tcfg, tok, precision)
    ds = fill_ds_config(read_ds_config(tcfg), tcfg, 1, precision, _model_config(model)["hidden_size"],
                        env.device == "cpu")
    device = torch.device("cuda", 0) if env.device == "cuda" else torch.device("cpu")
    rows = step_rows(len(split), cfg.steps + cfg.warmup, tcfg.micro_batch_size, cfg.gas, tcfg.seed)
    return tcfg, precision, split, tok, model, info, ds, device, rows


def attention_span(tcfg, split, rows) -> float | None:
    """doc_attention=block: the per-document attention span of the job's blocks (benchmarks.flops.
    document_attention_span), so MFU counts the attention that is model work, not the masked-out pairs;
    None = causal attention over the whole block."""
    if tcfg.doc_attention != "block":
        return None
    import numpy as np

    return document_attention_span(np.concatenate([split.pos[np.asarray(r)] for step in rows for r in step]))


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def memory_estimate(cfg: ThroughputConfig, tcfg, tok, ds: dict, precision: str, device) -> dict:
    """The engine's pre-training estimate (training.model.estimate_memory: DeepSpeed's model states + the
    activations measured on a 1/2-layer probe) for this job, in GiB, to set against the measured peak. The
    probe's own allocations are taken out of the CUDA peak afterwards."""
    import torch

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        dev_mem = int((memory_cap_fraction(cfg, total) or 1.0) * total)
    else:  # the host's memory, as the engine does
        dev_mem = host_memory_bytes()
    est = estimate_memory(tcfg, tok, zero_stage(ds), *offloads(ds), 1, 1, dev_mem, seq_len=cfg.seq_len,
                          precision=precision, device=device.type)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    states = est.get("device_bytes_lora", est.get("device_bytes", 0))
    act = est.get("activations", {}).get("total_bytes", 0)
    return {"model_states": states / 2**30, "activations": act / 2**30, "total": (states + act) / 2**30,
            "fits": est.get("fits")}


def run_tunesmith(cfg: ThroughputConfig) -> dict:
    """The engine's own code: :class:`training.trainer.Trainer`'s ``build_engine`` (optimizer, deepspeed.initialize,
    loss head) and ``train_step``, timed at its phases."""
    import deepspeed
    import torch

    tcfg, precision, split, tok, model, info, ds, device, rows = _setup(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _PROGRESS["at"] = "in the memory estimate"
    estimate = _PROGRESS["memory_estimate_gb"] = memory_estimate(cfg, tcfg, tok, ds, precision, device)
    _PROGRESS["at"] = "while building the DeepSpeed engine"
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    trainer = Trainer(tcfg, device, precision)
    trainer.build_engine(model, ds)
    trainer.train_split = split
    trainer.engine.train()
    times = {"data": [], "forward": [], "backward": [], "optimizer": [], "step": []}
    losses, cpu_times = [], []
    for s, r in enumerate(rows):
        _PROGRESS["at"] = f"in step {s + 1}"
        _sync(device)
        c0 = time.process_time()
        marks = [("start", time.perf_counter())]

        def on_phase(name):  # the step's phase boundaries, CUDA synchronised so a phase owns its kernels
            _sync(device)
            marks.append((name, time.perf_counter()))

        res = trainer.train_step(r, tcfg.lr, on_phase)  # the step's micro-batches = one optimizer step
        c4 = time.process_time()
        losses.append(res.loss)
        if s >= cfg.warmup:
            cpu_times.append(c4 - c0)
            for (_, t_prev), (name, t) in zip(marks, marks[1:]):
                times[name].append(t - t_prev)
            times["step"].append(marks[-1][1] - marks[0][1])
    breakdown = {k: sum(v) / len(v) for k, v in times.items() if k != "step"}
    out = {"step_times": times["step"], "step_cpu_times": cpu_times, "breakdown_s": breakdown,
           "losses": losses, "loss": trainer.loss_desc, "peak_memory_gb": peak_memory(device),
           "precision": precision, "n_params": info.n_params, "n_trainable": info.n_trainable,
           "modules_to_save": info.modules_to_save, "model_config": _model_config(model), "ds_config": ds,
           "memory_estimate_gb": estimate, "attention_span": attention_span(tcfg, split, rows)}
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    return out


def run_hf_trainer(cfg: ThroughputConfig) -> dict:
    import torch
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    if cfg.train.attn_implementation == "varlen":  # plain transformers: block attention is SDPA with the 4D mask
        cfg = replace(cfg, train=replace(cfg.train, attn_implementation="sdpa"))
    tcfg, precision, split, _tok, model, info, ds, device, rows = _setup(cfg)
    mask_dtype = DTYPES[precision]
    flat = [int(i) for step in rows for r in step for i in r]

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(flat)

        def __getitem__(self, i):
            b = make_batch(split, [flat[i]], tcfg.doc_attention, mask_dtype)
            return {"input_ids": b.input_ids[0], "labels": b.labels[0], "position_ids": b.position_ids[0],
                    "attention_mask": b.attention_mask[0]}

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0, self.c0, self.times, self.cpu_times = None, None, [], []

        def on_step_begin(self, args, state, control, **kw):
            _PROGRESS["at"] = f"in step {state.global_step + 1}"
            _sync(device)
            self.c0, self.t0 = time.process_time(), time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            self.times.append(time.perf_counter() - self.t0)
            self.cpu_times.append(time.process_time() - self.c0)

    adam = ds.get("optimizer", {}).get("params", {})
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_trainer_"), per_device_train_batch_size=tcfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gas, max_steps=len(rows), learning_rate=tcfg.lr, lr_scheduler_type="constant",
        weight_decay=tcfg.weight_decay, adam_beta1=tcfg.adam_beta1, adam_beta2=tcfg.adam_beta2,
        adam_epsilon=tcfg.adam_eps, max_grad_norm=tcfg.grad_clip, bf16=precision == "bf16", fp16=False,
        deepspeed=ds, gradient_checkpointing=False,  # the builder already enabled it when asked
        logging_steps=10**9, save_strategy="no", report_to=[], disable_tqdm=True, seed=tcfg.seed,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=device.type == "cpu")
    assert not adam or adam.get("lr") == tcfg.lr
    timer = Timer()
    _PROGRESS["at"] = "while building the Trainer and its DeepSpeed engine"
    trainer = HFTrainer(model=model, args=args, train_dataset=Blocks(), callbacks=[timer])
    # the Trainer shuffles with its own sampler; throughput does not depend on which blocks
    trainer.train()
    times = timer.times[cfg.warmup:]
    out = {"step_times": times, "step_cpu_times": timer.cpu_times[cfg.warmup:], "breakdown_s": {}, "losses": [],
           "peak_memory_gb": peak_memory(device),
           "precision": precision, "n_params": info.n_params, "n_trainable": info.n_trainable,
           "modules_to_save": info.modules_to_save, "model_config": _model_config(model), "ds_config": ds,
           "attention_span": attention_span(tcfg, split, rows)}
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out


def _model_config(model) -> dict:
    c = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    return {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "vocab_size", "tie_word_embeddings")}


# ----------------------------------------------------------------------------------------- orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(runner: str, cfg: ThroughputConfig, workdir: Path) -> dict:
    """Runs one runner in a fresh ``python -m benchmarks.train_throughput --worker RUNNER CFG OUT`` process
    as rank 0 of a world of 1; returns its JSON."""
    cfg_path, out_path = workdir / f"{runner}.cfg.json", workdir / f"{runner}.out.json"
    cfg_path.write_text(json.dumps(asdict(cfg)))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    repo = Path(__file__).resolve().parents[1]
    # the DeepSpeed CPU ops compiled once are shared with the tests and the trainer (scripts/env.sh sets the same)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tunesmith" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--worker", runner, str(cfg_path), str(out_path)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, cwd=str(repo), capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        # the runner's own traceback is what matters; this process's would only add noise above it
        raise ArgumentError(f"{tail}\nerror: the {runner} runner failed (exit {proc.returncode}); its last lines are above")
    res = json.loads(out_path.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def recompute_fraction(cfg: ThroughputConfig, n_layers: int) -> float:
    """Fraction of decoder layers gradient checkpointing recomputes (layers 0, K, 2K, ...)."""
    if not cfg.train.gradient_checkpointing:
        return 0.0
    return len(range(0, n_layers, cfg.train.gradient_checkpointing_every)) / n_layers


def summarise(cfg: ThroughputConfig, res: dict, peak) -> dict:
    """tokens/s, MFU, HFU of one runner's raw step times."""
    mc = res["model_config"]
    shape = Shape(mc["num_hidden_layers"], mc["hidden_size"], mc["intermediate_size"], mc["num_attention_heads"],
                  mc["num_key_value_heads"], mc["vocab_size"], bool(mc["tie_word_embeddings"]))
    mts = res.get("modules_to_save") or []
    span = res.get("attention_span") or cfg.seq_len  # block attention: only in-document pairs are model FLOPs
    fl = train_flops_per_token(shape, span, cfg.train.train_type, lora_r=cfg.train.lora_r,
                               trainable_embed="embed_tokens" in mts, trainable_lm_head="lm_head" in mts,
                               recompute=recompute_fraction(cfg, shape.n_layers))
    times = sorted(res["step_times"])
    mean = sum(times) / len(times)
    median = _median(times)
    step_tokens = cfg.train.global_batch_size * cfg.seq_len
    tps = step_tokens / median
    cpu_median = _median(res["step_cpu_times"])
    return {"tokens_per_s": tps, "tokens_per_s_mean": step_tokens / mean, "step_s_median": median,
            "step_s_mean": mean, "step_s_min": times[0], "step_s_max": times[-1],
            "step_cpu_s_median": cpu_median, "tokens_per_cpu_s": step_tokens / cpu_median,
            "mfu": tps * fl.model / peak.flops, "hfu": tps * fl.hardware / peak.flops,
            "flops_per_token": fl.as_dict(), "peak_memory_gb": res["peak_memory_gb"],
            "memory_estimate_gb": res.get("memory_estimate_gb"), "attention_span": span}


def run(cfg: ThroughputConfig) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the peak is measured before any runner starts (on CPU: a big fp32 matmul on an idle process)
    dtype = torch.float32 if device.type == "cpu" and cfg.train.precision in ("auto", "fp32") else torch.bfloat16
    peak = device_peak(device, dtype)
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="tunesmith_tp_") as tmp:
        from tqdm.auto import tqdm

        rounds: dict[str, list] = {r: [] for r in cfg.runners()}
        oom: dict[str, dict] = {}  # runners that ran out of memory: the job does not fit (no further rounds)
        for _ in tqdm(range(cfg.rounds), desc="train_throughput rounds", unit="round"):
            for runner in cfg.runners():  # alternate, so a busy spell of a shared machine hits both
                if runner in oom:
                    continue
                raw = spawn(runner, cfg, Path(tmp))
                if "out_of_memory" in raw:
                    oom[runner] = {"fits": False, **{k: v for k, v in raw.items() if k != "wall_s"}}
                else:
                    rounds[runner].append({**summarise(cfg, raw, peak), "raw": raw})
        for runner, rs in rounds.items():
            if runner in oom:
                continue
            best = max(rs, key=lambda r: r["tokens_per_s"])
            results[runner] = {**best, "fits": True, "rounds_tokens_per_s": [r["tokens_per_s"] for r in rs]}
    if oom:
        return _does_not_fit(cfg, peak, results, oom)
    for name, r in results.items():
        bd = r["raw"]["breakdown_s"]
        rows.append([name, f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_cpu_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                     f"{r['peak_memory_gb']:.2f}",
                     f"{1000 * r['step_s_median']:.0f}"] +
                    ([f"{1000 * bd[k]:.0f}" for k in ("data", "forward", "backward", "optimizer")] if bd else ["-"] * 4))
    ratio = cpu_ratio = None
    if "hf_trainer" in results:
        ratio = results["tunesmith"]["tokens_per_s"] / results["hf_trainer"]["tokens_per_s"]
        cpu_ratio = results["tunesmith"]["tokens_per_cpu_s"] / results["hf_trainer"]["tokens_per_cpu_s"]
    first = next(iter(results.values()))["raw"]
    out = {"benchmark": "train_throughput", "config": asdict(cfg), "device": peak.as_dict(),
           "precision": first["precision"], "n_params": first["n_params"], "n_trainable": first["n_trainable"],
           "results": {k: {kk: vv for kk, vv in v.items() if kk != "raw"} | {"breakdown_s": v["raw"]["breakdown_s"],
                                                                          "losses": v["raw"]["losses"],
                                                                          "loss": v["raw"].get("loss"),
                                                                          "step_times": v["raw"]["step_times"]}
                       for k, v in results.items()},
           "ds_config": first["ds_config"], "tunesmith_vs_hf_trainer": ratio,
           "tunesmith_vs_hf_trainer_cpu_time": cpu_ratio, "environment": environment()}
    path = cfg.output_path()
    write_json(path, out)
    print(f"\n{cfg.train.model} {cfg.train.train_type}, {describe_batch(cfg)}, ZeRO-{zero_stage(first['ds_config'])}, "
          f"{first['precision']}, {first['n_params'] / 1e6:.2f} M params ({first['n_trainable'] / 1e6:.2f} M trainable)"
          f", {peak.device} (peak {peak.flops / 1e12:.2f} TFLOP/s, {peak.source}), {cfg.steps} timed steps; "
          f"tunesmith loss: {first.get('loss') or '-'}"
          + (f"; block attention over packed documents, MFU counts an attention span of {first['attention_span']:.0f}"
             f" tokens (causal over the whole block: {cfg.seq_len})" if first.get("attention_span") else ""))
    if "chunked" in (first.get("loss") or ""):
        print("(fwd ms includes the chunked loss's gradient computation for lm_head and the last hidden state)")
    print(markdown_table(["runner", "tokens/s/device", "tokens/CPU-s", "MFU", "peak mem GB", "median step ms", "data ms", "fwd ms",
                          "bwd ms", "opt ms"], rows))
    est = results["tunesmith"].get("memory_estimate_gb")
    if est:
        print(f"tunesmith memory estimate before training: {est['model_states']:.2f} GiB model states + "
              f"{est['activations']:.2f} GiB activations = {est['total']:.2f} GiB (measured peak "
              f"{results['tunesmith']['peak_memory_gb']:.2f} GiB{', CPU RSS incl. the process' if device.type == 'cpu' else ''})")
    if ratio is not None:
        print(f"tunesmith / hf_trainer tokens/s: {ratio:.2f}x (per process CPU-second: {cpu_ratio:.2f}x)")
    print(f"results -> {path}")
    out["output"] = str(path)
    return out


def describe_batch(cfg: ThroughputConfig) -> str:
    t = cfg.train
    return f"seq {cfg.seq_len} x micro batch {t.micro_batch_size}" + (f" x {cfg.gas} accumulated" if cfg.gas > 1 else "")


def _does_not_fit(cfg: ThroughputConfig, peak, fitted: dict, oom: dict) -> dict:
    """The verdict of a job that ran out of memory in at least one runner: JSON with ``"fits": false`` and where
    it ran out, one line per runner, and ``out["out_of_memory"]`` (the command then exits 3)."""
    cap = ""
    if cfg.memory_gb or cfg.memory_fraction:
        cap = f" under a {cfg.memory_gb:g} GiB cap" if cfg.memory_gb else f" under a {cfg.memory_fraction:g} memory fraction"
    results = {k: {kk: vv for kk, vv in v.items() if kk != "raw"} for k, v in fitted.items()} | oom
    out = {"benchmark": "train_throughput", "config": asdict(cfg), "device": peak.as_dict(), "fits": False,
           "out_of_memory": sorted(oom), "results": results, "environment": environment()}
    path = cfg.output_path()
    write_json(path, out)
    print(f"\n{cfg.train.model} {cfg.train.train_type}, {describe_batch(cfg)}, {cfg.train.ds_config}, "
          f"{peak.device}{cap}:")
    for runner, r in results.items():
        if r["fits"]:
            print(f"  {runner}: fits, {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_memory_gb']:.2f} GiB")
            continue
        o, est = r["out_of_memory"], r.get("memory_estimate_gb") or {}
        print(f"  {runner}: does not fit -- ran out of memory {o['at']}: {o['error']}; peak {r['peak_memory_gb']:.2f} "
              f"GiB" + (f"; estimated before training: {est['total']:,.2f} GiB" if est.get("total") else ""))
    print(f"results -> {path}")
    out["output"] = str(path)
    return out


def worker(runner: str, cfg_path: str, out_path: str) -> None:
    """One runner; an allocation failure (CUDA OOM under ``--memory_gb``, the host allocator on CPU) is a result --
    the job does not fit -- written as ``{"out_of_memory": {...}}`` instead of a traceback."""
    import torch

    cfg = ThroughputConfig.from_dict(json.loads(Path(cfg_path).read_text()))
    try:
        res = {"tunesmith": run_tunesmith, "hf_trainer": run_hf_trainer}[runner](cfg)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        res = {"out_of_memory": {"at": _PROGRESS["at"], "error": out_of_memory_summary(e),
                                 "message": (str(e).splitlines() or [""])[0][:1000]},
               "peak_memory_gb": peak_memory(device), "memory_estimate_gb": _PROGRESS["memory_estimate_gb"]}
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(res, default=str))


@exit_on_argument_error
def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # internal: one runner in its own process (see spawn)
        worker(*argv[1:4])
        return None
    return run(parse_config(ThroughputConfig, argv, description=__doc__))


if __name__ == "__main__":
    _out = main()
    raise SystemExit(3 if _out and _out.get("out_of_memory") else 0)

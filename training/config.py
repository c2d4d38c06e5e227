"""The typed job config of ``training/train.py`` and the checks that refuse bad combinations early.

A job is one :class:`TrainConfig`, read from YAML/JSON (``--config x.yaml``) and then patched with
``key=value`` overrides from the command line. Every field is used by the trainer (no dead flags).

:func:`validate` runs before any model is loaded and raises :class:`ConfigError` with a one-line
reason plus the fix, e.g. ``precision: fp16 needs a GPU; this run is on CPU. Fix: precision=fp32``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from data_preprocess.config import ConfigError, collect
from data_preprocess.hub import ArgumentError
from data_preprocess.model_source import is_model_source, read_record, resolve_source
from data_preprocess.shards import open_split, read_meta
from data_preprocess.train_tokenizer import tokenizer_identity

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    """One training job (``training/train.py``): each field below is a YAML/JSON key and a ``key=value``
    override; docs/reference.md lists them all (``python scripts/gen_reference.py`` writes it)."""

    # ---- data -------------------------------------------------------------------------------------
    mode: str = "pt"
    """must equal the shards' meta.json mode (pt | sft | any later mode)"""
    data_dir: list[str] = field(default_factory=list)
    """a data_preprocess output dir (meta.json + {train,val}.*.bin); several (a YAML list or DIR,DIR) are one mixture
    -- same mode, tokenizer and max_len -- e.g. ABC shards and general-text shards, as MusicPile mixes them"""
    data_weights: list[float] = field(default_factory=list)
    """with several data_dir: each source's share of the train stream (normalised; a source may have 0); empty = each
    in proportion to its blocks (one shuffled stream over all of them). Losses are also logged per source
    (loss/NAME, val_loss/NAME; NAME = the dir's name)"""
    tokenizer: str = ""
    """tokenizer dir; default: DATA_DIR/tokenizer (copied there by preprocess)"""
    doc_attention: str = "causal"
    """causal: packed docs share one causal mask (positions still reset per doc); block: a block-diagonal 4D mask, a
    token never attends to an earlier doc"""
    # ---- model ------------------------------------------------------------------------------------
    model: str = "llama-small"
    """a training.presets name (random init) or an HF model dir / hub id"""
    train_type: str = "full"
    """full | lora"""
    lora_r: int = 64
    """LoRA rank (ChatMusician: 64)"""
    lora_alpha: int = 16
    """LoRA scale numerator: the update is scaled by lora_alpha / lora_r (ChatMusician: 16)"""
    lora_dropout: float = 0.1
    """dropout on the LoRA branch input (ChatMusician: 0.1)"""
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    """the Linear layers that get LoRA adapters (default: all attention and MLP projections)"""
    lora_modules_to_save: list[str] | None = None
    """None = default: [embed_tokens, lm_head] in pt mode (ChatMusician trains embeddings), else [] unless the
    tokenizer adds tokens to the base model (then the resized embeddings must be trained and saved)"""
    tied_embeddings: str = "shared"
    """a base whose lm_head IS embed_tokens (tie_word_embeddings, e.g. SmolLM2) with the embeddings in
    lora_modules_to_save -- shared: one trained matrix serves both (PEFT ensure_weight_tying; the merged model
    stays tied, like the base); untie: embed_tokens and lm_head become two trained copies (the merged model has
    tie_word_embeddings false and twice the embedding parameters). Logged and recorded either way."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | varlen (with doc_attention=block: attention given the document bounds, no [B,1,L,L] mask; flash
    varlen kernel on a GPU in bf16/fp16, exact per-document SDPA elsewhere -- training/attention.py)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward instead of storing them (less memory, about 1/3 more compute)"""
    gradient_checkpointing_every: int = 1
    """with gradient_checkpointing: recompute 1 of every K decoder layers (1 = all layers, least memory; 2 = half the
    layers, half the recompute for more activation memory -- the speed/memory dial between on and off)"""
    loss: str = "auto"
    """chunked: cross-entropy from the last hidden state chunk by chunk, the full [tokens, vocab] fp32 logits never
    exist (training/fused_loss.py); hf: the model's logits + F.cross_entropy; auto: chunked where it can run (any
    ZeRO stage; not with LoRA on lm_head), else hf"""
    compile: bool = False
    """torch.compile each decoder layer (fuses norms/rotary/SwiGLU; ZeRO 0-2 only; the first steps pay the compile
    time)"""
    loss_chunk_size: int = 1024
    """tokens per chunk of the chunked loss (peak extra memory chunk x vocab x 4 B)"""
    # ---- optimisation -----------------------------------------------------------------------------
    max_steps: int = 0
    """optimizer steps; 0 = derive from num_epochs"""
    num_epochs: float = 1.0
    """passes over the train blocks when max_steps is 0"""
    global_batch_size: int = 8
    """sequences per optimizer step over all ranks"""
    micro_batch_size: int = 4
    """sequences per forward per rank; accumulation = global / (micro * world)"""
    lr: float = 3e-4
    """peak learning rate (after warmup; the schedule is training/schedule.py)"""
    min_lr_ratio: float = 0.1
    """cosine decays to lr * min_lr_ratio"""
    warmup_ratio: float = 0.05
    """linear warmup over this fraction of max_steps"""
    weight_decay: float = 0.1
    """matrices only (no norms, no biases)"""
    adam_beta1: float = 0.9
    """AdamW beta1 (filled into the ds_config optimizer, or the client optimizer)"""
    adam_beta2: float = 0.95
    """AdamW beta2"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (DeepSpeed gradient_clipping; 0 = off)"""
    optimizer: str = "deepspeed"
    """deepspeed: the ds_config optimizer (FusedAdam / DeepSpeedCPUAdam with offload / torch AdamW on CPU); torch: a
    client torch.optim.AdamW"""
    # ---- DeepSpeed / precision --------------------------------------------------------------------
    ds_config: str = "ds_configs/zero2.json"
    """the DeepSpeed JSON (ds_configs/zero0..3.json, *_offload.json); its "auto" values are filled from this config"""
    precision: str = "auto"
    """auto (bf16 GPU > fp16 older GPU > fp32 CPU) | bf16 | fp16 | fp32"""
    seed: int = 42
    """seed of initialisation, data order and dropout (per-rank RNG states are checkpointed)"""
    rendezvous_timeout_s: float = 600
    """multi-node: a rank other than 0 waits this long for rank 0's address (MASTER_ADDR:MASTER_PORT) to answer, then
    stops with one line"""
    # ---- checkpoints ------------------------------------------------------------------------------
    output_dir: str = "outputs/run"
    """where job.json, metrics.jsonl, checkpoints/, final/ (the HF export) and loss_curve.png go"""
    save_every: int = 0
    """0 = only at the end"""
    keep_last: int = 2
    """keep the newest K checkpoints (0 = keep all)"""
    resume: str = ""
    """"" (refuse if checkpoints exist) | auto | PATH (checkpoint dir)"""
    verify_export: bool = False
    """reload the final HF export with plain transformers/peft, compare logits"""
    # ---- logging / eval ---------------------------------------------------------------------------
    log_every: int = 10
    """print a step line (loss, lr, grad norm, tokens/s, memory) every N steps (always the first and last)"""
    eval_every: int = 0
    """0 = only at the end"""
    eval_max_batches: int = 0
    """0 = the whole val split"""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """metrics sinks besides metrics.jsonl: tensorboard, wandb (none = [])"""
    wandb_project: str = "tunesmith"
    """the Weights & Biases project when report_to holds wandb"""
    run_name: str = ""
    """the run name for tensorboard / wandb ("" = their default)"""

    # -------------------------------------------------------------------------------------------------
    def __post_init__(self):
        if isinstance(self.data_dir, str):  # TrainConfig(data_dir="DIR") in Python, as on the command line
            self.data_dir = [d.strip() for d in self.data_dir.split(",") if d.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def batch_attention(self) -> str:
        """How ``training.data.make_batch`` lays out attention: causal | block (4D mask) | varlen (bounds)."""
        return "varlen" if self.attn_implementation == "varlen" else self.doc_attention

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or str(Path(self.data_dir[0] if self.data_dir else "") / "tokenizer")


# Hugging Face Trainer / ChatMusician argument names -> ours (a typo of these is matched by spelling)
_ALIASES = {"learning_rate": "lr", "num_train_epochs": "num_epochs", "per_device_train_batch_size": "micro_batch_size",
            "model_name_or_path": "model", "deepspeed": "ds_config", "lora_rank": "lora_r"}


def load_config(path: str | None = None, overrides: list[str] | tuple = (), resume: str | None = None) -> TrainConfig:
    """YAML/JSON file (optional) -> dataclass, then ``key=value`` overrides, then ``--resume``: the one loader of
    every command (``data_preprocess.config.collect``), with the Hugging Face Trainer names as suggestions."""
    values = collect(TrainConfig, path, {}, overrides, aliases=_ALIASES)
    if resume is not None:
        values["resume"] = resume
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------------
# ds_config: read, and fill "auto" values from the job
# ------------------------------------------------------------------------------------------------
def resolve_path(p: str) -> Path:
    """Relative paths are taken from the working directory, then from the repository root."""
    q = Path(p)
    if q.is_absolute() or q.exists():
        return q
    return REPO / q if (REPO / q).exists() else q


def read_ds_config(cfg: TrainConfig) -> dict:
    p = resolve_path(cfg.ds_config)
    if not p.is_file():
        raise ConfigError(f"ds_config: {cfg.ds_config} not found. Fix: ds_config=ds_configs/zero2.json (or zero0..3, *_offload)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config: {p} line {e.lineno}: {e.msg}. Fix: correct the JSON") from e


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads(ds: dict) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) to a CPU/NVMe device."""
    z = ds.get("zero_optimization", {})
    opt = z.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    par = z.get("offload_param", {}).get("device", "none") not in ("none", None)
    return opt, par


def fill_ds_config(ds: dict, cfg: TrainConfig, world_size: int, precision: str, hidden_size: int,
                   on_cpu: bool) -> dict:
    """Returns a copy of ``ds`` with every ``"auto"`` replaced by the job's value; unknown autos are refused."""
    ds = json.loads(json.dumps(ds))
    gas = cfg.global_batch_size // (cfg.micro_batch_size * world_size)
    top = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": gas,
           "train_batch_size": cfg.global_batch_size, "gradient_clipping": cfg.grad_clip}
    for k, v in top.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds.setdefault("steps_per_print", 10**9)  # our own logger prints
    ds.setdefault("wall_clock_breakdown", False)
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        ds.setdefault(key, {})
        if ds[key].get("enabled", "auto") == "auto":
            ds[key]["enabled"] = on
    if "optimizer" in ds:
        if cfg.optimizer == "torch":
            del ds["optimizer"]  # a client optimizer is passed to deepspeed.initialize instead
        else:
            p = ds["optimizer"].setdefault("params", {})
            for k, v in (("lr", cfg.lr), ("betas", [cfg.adam_beta1, cfg.adam_beta2]), ("eps", cfg.adam_eps),
                         ("weight_decay", cfg.weight_decay)):
                if p.get(k, "auto") == "auto":
                    p[k] = v
            if not offloads(ds)[0] and (on_cpu or fused_adam_unavailable()):
                # FusedAdam is a CUDA kernel, built just in time: plain CPU runs, and GPUs where it cannot be
                # built (no nvcc / ninja), use torch.optim.AdamW (foreach over the parameters on CUDA)
                p["torch_adam"] = True
    z = ds.get("zero_optimization", {})
    h2 = hidden_size * hidden_size
    # overlap_comm double-buffers the buckets (DeepSpeed: ~4.5x the bucket sizes, 9 GB at 5e8 in bf16): only worth
    # it when there is communication to overlap, i.e. more than one rank. Buckets: 2e8 elements for ZeRO-1/2
    # (HF's recommendation), hidden^2 for ZeRO-3 (prefetch 0.9 hidden^2), as transformers' "auto" does.
    for k, v in (("overlap_comm", world_size > 1),
                 ("reduce_bucket_size", h2 if zero_stage(ds) == 3 else 200_000_000),
                 ("allgather_bucket_size", 200_000_000),
                 ("stage3_prefetch_bucket_size", int(0.9 * h2)),
                 ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if z.get(k) == "auto":
            z[k] = v
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ConfigError(f"ds_config {cfg.ds_config}: no job value for 'auto' at {left}. Fix: give a number there")
    return ds


@functools.cache
def fused_adam_unavailable() -> str | None:
    """Why DeepSpeed's FusedAdam cannot be used on this machine's GPU (a reason to log), or None. It is a CUDA
    op that DeepSpeed compiles on first use unless it was installed prebuilt (DS_BUILD_FUSED_ADAM=1). On a GPU
    it is built here, once per process (cached in TORCH_EXTENSIONS_DIR), so that a toolchain that cannot build
    it (nvcc too new or too old for DeepSpeed's sources, say) costs a warning and torch's AdamW, not the run."""
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("fused_adam"):
            return None
    except ImportError:
        pass
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) to compile DeepSpeed's FusedAdam"
    if not is_ninja_available():
        return "no ninja to compile DeepSpeed's FusedAdam (pip install ninja)"
    import torch

    if torch.cuda.is_available():
        from deepspeed.ops.op_builder import FusedAdamBuilder

        try:
            FusedAdamBuilder().load(verbose=False)
        except (RuntimeError, OSError, ImportError, ValueError, subprocess.SubprocessError) as e:
            # a compiler error, DeepSpeed's version checks, a missing header or library: all mean "not here"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"building DeepSpeed's FusedAdam failed ({type(e).__name__}: {first})"
    return None


def _walk(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk(v, key + ".")
        else:
            yield key, v


# ------------------------------------------------------------------------------------------------
# validation: everything that can be checked before a model is loaded
# ------------------------------------------------------------------------------------------------
@dataclass
class Environment:
    """What the job runs on (detect_environment), as the validators need it."""

    world_size: int
    """ranks in the job (WORLD_SIZE)"""
    device: str
    """cuda | cpu"""
    bf16_supported: bool = False
    """the GPU computes in bf16 (Ampere or newer)"""


def detect_environment() -> Environment:
    import torch

    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        return Environment(ws, "cuda", torch.cuda.is_bf16_supported())
    return Environment(ws, "cpu", False)


def resolve_precision(cfg: TrainConfig, env: Environment) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if env.device == "cuda":
        return "bf16" if env.bf16_supported else "fp16"
    return "fp32"


def model_config_dict(model: str) -> dict | None:
    """config.json of an HF model dir (no weights loaded); None for presets and hub ids."""
    p = Path(model) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def validate(cfg: TrainConfig, env: Environment) -> dict:
    """Refuses invalid jobs with a one-line reason + fix, before any model loads: the checks below, by topic, in
    this order. Returns facts learnt on the way (meta, ds config, tokenizer, ...).

    A ``model`` given as a named source or ``PATH.gguf`` is imported here and ``cfg.model`` is set to the
    imported HF dir (``facts["model_source"]`` keeps what was asked for, for job.json)."""
    check_choices(cfg)
    check_optimization(cfg, env)
    check_lora(cfg)
    precision = check_precision(cfg, env)
    ds = check_deepspeed(cfg)
    sources = check_data(cfg)
    meta = sources[0]["meta"]
    tok, ident = check_tokenizer(cfg, sources)
    model_source, hidden, base_vocab = check_model(cfg, meta, tok)
    check_output(cfg)
    check_reporting(cfg)
    return {"meta": meta, "ds": ds, "precision": precision, "tokenizer": tok, "tokenizer_identity": ident,
            "hidden_size": hidden, "base_vocab": base_vocab, "sources": sources, "model_source": model_source}


def _bad(msg: str):
    raise ConfigError(msg)


CHOICES = {"train_type": ("full", "lora"), "precision": ("auto", "bf16", "fp16", "fp32"),
           "optimizer": ("deepspeed", "torch"), "doc_attention": ("causal", "block"),
           "attn_implementation": ("sdpa", "eager", "varlen"), "loss": ("auto", "chunked", "hf"),
           "tied_embeddings": ("shared", "untie")}
"""The allowed values of the job's choice fields (the first is the one a fix suggests)."""


def check_choices(cfg: TrainConfig) -> None:
    """Every choice field holds one of its values; ``report_to`` names known trackers."""
    for k, allowed in CHOICES.items():
        if getattr(cfg, k) not in allowed:
            _bad(f"{k}={getattr(cfg, k)!r} is not one of {list(allowed)}. Fix: {k}={allowed[0]}")
    for r in cfg.report_to:
        if r not in ("tensorboard", "wandb", "none"):
            _bad(f"report_to: {r!r} unknown. Fix: report_to=tensorboard,wandb (or none)")


def check_optimization(cfg: TrainConfig, env: Environment) -> None:
    """Batch sizes (the global batch splits evenly over micro-batches x ranks), the LR schedule, clipping,
    activation checkpointing, attention and the loss: numbers in range and combinations that can run."""
    if not cfg.rendezvous_timeout_s > 0:
        _bad(f"rendezvous_timeout_s={cfg.rendezvous_timeout_s} must be > 0. Fix: rendezvous_timeout_s=600")
    if cfg.micro_batch_size < 1 or cfg.global_batch_size < 1:
        _bad("micro_batch_size and global_batch_size must be >= 1. Fix: e.g. global_batch_size=8 micro_batch_size=4")
    per_step = cfg.micro_batch_size * env.world_size
    if cfg.global_batch_size % per_step:
        _bad(f"global_batch_size={cfg.global_batch_size} is not divisible by micro_batch_size x world size = "
             f"{cfg.micro_batch_size} x {env.world_size}. Fix: global_batch_size="
             f"{max(1, round(cfg.global_batch_size / per_step)) * per_step}")
    if not cfg.lr > 0:
        _bad(f"lr={cfg.lr} must be > 0. Fix: lr=1e-4")
    if not 0 <= cfg.warmup_ratio < 1:
        _bad(f"warmup_ratio={cfg.warmup_ratio} must be in [0, 1). Fix: warmup_ratio=0.05")
    if not 0 <= cfg.min_lr_ratio <= 1:
        _bad(f"min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]. Fix: min_lr_ratio=0.1")
    if cfg.max_steps < 0 or (cfg.max_steps == 0 and not cfg.num_epochs > 0):
        _bad("nothing to train: max_steps=0 and num_epochs<=0. Fix: max_steps=1000 or num_epochs=1")
    if cfg.gradient_checkpointing_every < 1:
        _bad(f"gradient_checkpointing_every={cfg.gradient_checkpointing_every} must be >= 1 (1 = every layer). "
             "Fix: gradient_checkpointing_every=1")
    if cfg.gradient_checkpointing_every != 1 and not cfg.gradient_checkpointing:
        _bad(f"gradient_checkpointing_every={cfg.gradient_checkpointing_every} selects layers to recompute, but "
             "gradient_checkpointing is off. Fix: gradient_checkpointing=true (or drop gradient_checkpointing_every)")
    if cfg.attn_implementation == "varlen" and cfg.doc_attention != "block":
        _bad("attn_implementation=varlen computes doc_attention=block (a token sees only its own packed document), "
             f"but doc_attention={cfg.doc_attention}. Fix: doc_attention=block, or attn_implementation=sdpa")
    if cfg.loss_chunk_size < 1:
        _bad(f"loss_chunk_size={cfg.loss_chunk_size} must be >= 1. Fix: loss_chunk_size=1024")
    if cfg.loss == "chunked" and cfg.train_type == "lora" and "lm_head" in cfg.lora_target_modules:
        _bad("loss=chunked reads lm_head's weight, but lora_target_modules puts a LoRA adapter on lm_head. "
             "Fix: loss=auto (falls back to the HF loss) or drop lm_head from lora_target_modules")
    if cfg.grad_clip < 0:
        _bad(f"grad_clip={cfg.grad_clip} must be >= 0 (0 = off). Fix: grad_clip=1.0")


def check_lora(cfg: TrainConfig) -> None:
    """train_type=lora: a rank, alpha and dropout in range and at least one target module."""
    if cfg.train_type == "lora":
        if cfg.lora_r < 1 or cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1:
            _bad("lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1 are required. Fix: lora_r=64 lora_alpha=16 lora_dropout=0.1")
        if not cfg.lora_target_modules:
            _bad(f"lora_target_modules is empty. Fix: lora_target_modules={','.join(LLAMA_PROJECTIONS)}")


def check_precision(cfg: TrainConfig, env: Environment) -> str:
    """The precision the job runs in (``auto`` resolved), refused where the hardware lacks it."""
    precision = resolve_precision(cfg, env)
    if env.device == "cpu" and precision == "fp16":
        _bad("precision=fp16 needs a GPU (DeepSpeed's fp16 loss scaling is CUDA-only); this run is on CPU. Fix: precision=fp32")
    if env.device == "cuda" and precision == "bf16" and not env.bf16_supported:
        _bad("precision=bf16 but this GPU has no bf16 (pre-Ampere). Fix: precision=fp16 (dynamic loss scaling)")
    return precision


def check_deepspeed(cfg: TrainConfig) -> dict:
    """The job's DeepSpeed config (read, not yet filled), refused where its offload / stage / optimizer block
    cannot run with the job's optimizer and compile settings."""
    ds = read_ds_config(cfg)
    off_opt, off_par = offloads(ds)
    if off_opt and cfg.optimizer == "torch":
        _bad(f"{cfg.ds_config} offloads the optimizer to CPU, which needs DeepSpeed's optimizer (DeepSpeedCPUAdam), "
             "not a torch optimizer. Fix: optimizer=deepspeed")
    if off_opt and "optimizer" not in ds:
        _bad(f"{cfg.ds_config} offloads the optimizer but has no \"optimizer\" block, so DeepSpeed cannot build "
             "DeepSpeedCPUAdam. Fix: add \"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": \"auto\"}}")
    if off_par and zero_stage(ds) != 3:
        _bad(f"{cfg.ds_config}: offload_param needs ZeRO stage 3. Fix: ds_config=ds_configs/zero3_offload.json")
    if cfg.compile and zero_stage(ds) == 3:
        _bad(f"compile=true with ZeRO-3 ({cfg.ds_config}): ZeRO-3 gathers parameters in module hooks that break "
             "torch.compile's graphs. Fix: compile=false, or a ZeRO-0/1/2 ds_config")
    if cfg.optimizer == "deepspeed" and "optimizer" not in ds:
        _bad(f"optimizer=deepspeed but {cfg.ds_config} has no \"optimizer\" block. Fix: optimizer=torch, or use a ds_configs/*.json")
    return ds


def check_tokenizer(cfg: TrainConfig, sources: list[dict]):
    """(tokenizer, its identity): the tokenizer the shards were made with (same vocab and hash), with a pad token."""
    meta, tdir = sources[0]["meta"], Path(cfg.tokenizer_dir)
    if not tdir.is_dir():
        _bad(f"tokenizer {tdir}: not a directory. Fix: tokenizer=DIR (the one the shards were made with)")
    from transformers import AutoTokenizer  # heavy: only once the cheap checks passed

    tok = AutoTokenizer.from_pretrained(str(tdir))
    ident = tokenizer_identity(tdir, tok)
    mtok = meta.get("tokenizer", {})
    if ident["vocab_size"] != meta["vocab_size"] or (mtok.get("hash") and mtok["hash"] != ident["hash"]):
        d0 = sources[0]["dir"]
        _bad(f"tokenizer {tdir} (vocab {ident['vocab_size']}, hash {ident['hash']}) is not the one the shards in "
             f"{d0} were made with (vocab {meta['vocab_size']}, hash {mtok.get('hash')}). Fix: "
             f"tokenizer={Path(d0) / 'tokenizer'} or re-run data_preprocess with this tokenizer")
    if tok.pad_token_id is None:
        _bad(f"tokenizer {tdir} has no pad token. Fix: re-save it with a pad token distinct from eos")
    return tok, ident


def check_model(cfg: TrainConfig, meta: dict, tok):
    """(model source record or None, hidden size, base vocab or None): the model exists (a preset, an HF dir or a
    hub id; a named source / .gguf is imported and ``cfg.model`` set to its dir), its positions fit the shards'
    max_len, and LoRA trains the rows a larger tokenizer adds."""
    from training.presets import PRESETS  # (here: transformers; config stays torch-free)

    model_source = None
    if is_model_source(cfg.model):
        # smollm2-135m / PATH.gguf: imported once into a cached HF dir (a lock makes the ranks import it once);
        # from here on the job -- engine, checkpoints' model_source, merge -- uses that dir
        try:
            resolved = resolve_source(cfg.model)
        except ArgumentError as e:
            _bad(f"model={e}")
        record = read_record(resolved) or {}
        model_source = {"source": cfg.model, "dir": resolved, "sha256": record.get("sha256"),
                        "quantization": record.get("quantization")}
        cfg.model = resolved
    base_vocab = None
    if cfg.model in PRESETS:
        max_pos = PRESETS[cfg.model]["max_position_embeddings"]
        hidden = PRESETS[cfg.model]["hidden_size"]
    else:
        mc = model_config_dict(cfg.model)
        looks_local = cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") != 1  # hub ids are org/name
        if mc is None and (Path(cfg.model).exists() or looks_local):
            _bad(f"model={cfg.model}: not a preset and no config.json there. Fix: a preset ({sorted(PRESETS)}) or an HF model dir")
        max_pos = (mc or {}).get("max_position_embeddings", 10**9)
        hidden = (mc or {}).get("hidden_size", 4096)
        base_vocab = (mc or {}).get("vocab_size")
    if meta["max_len"] > max_pos:
        _bad(f"shards have max_len {meta['max_len']} > the model's max_position_embeddings {max_pos}. Fix: "
             f"re-run data_preprocess with --max_len {max_pos}")
    resized = base_vocab is not None and len(tok) > base_vocab
    if cfg.train_type == "lora" and resized and cfg.lora_modules_to_save is not None and not {
            "embed_tokens", "lm_head"} <= set(cfg.lora_modules_to_save):
        _bad(f"the tokenizer adds {len(tok) - base_vocab} tokens to {cfg.model}, but lora_modules_to_save="
             f"{cfg.lora_modules_to_save} leaves the new rows untrained and unsaved. Fix: "
             "lora_modules_to_save=embed_tokens,lm_head")
    return model_source, hidden, base_vocab


def check_output(cfg: TrainConfig) -> None:
    """``resume`` names an existing checkpoint, or the output dir holds none a fresh run would mix with."""
    ckpt = Path(cfg.output_dir) / "checkpoints"
    if cfg.resume not in ("", "auto"):
        if not Path(cfg.resume).exists():
            _bad(f"resume={cfg.resume}: no such checkpoint. Fix: resume=auto or a path like {ckpt}/step-00000100")
    elif cfg.resume == "" and (ckpt / "latest").exists():
        _bad(f"{cfg.output_dir} already has checkpoints ({(ckpt / 'latest').read_text().strip()}). Fix: resume=auto "
             "to continue, or a new output_dir")


def check_reporting(cfg: TrainConfig) -> None:
    """The trackers ``report_to`` names are installed."""
    if "wandb" in cfg.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            _bad("report_to includes wandb but wandb is not installed. Fix: pip install wandb, or report_to=tensorboard")


def check_data(cfg: TrainConfig) -> list[dict]:
    """The job's data sources, each ``{"name", "dir", "meta", "train_blocks", "val_blocks", "weight"}``, or a
    ConfigError naming the directory or the weight to change: every dir a preprocess output of ``cfg.mode`` with
    train and val blocks; several dirs (a mixture) made with one tokenizer and one max_len; weights one per dir,
    >= 0, not all 0."""
    if not cfg.data_dir:
        _bad("data_dir is empty. Fix: data_dir=DIR made by `python -m data_preprocess.preprocess -o DIR ...`")
    resolved = [str(Path(d).resolve()) for d in cfg.data_dir]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            _bad(f"data_dir lists {cfg.data_dir[i]} twice. Fix: give each shard dir once (data_weights sets its share)")
    w = list(cfg.data_weights)
    if w and len(w) != len(cfg.data_dir):
        _bad(f"data_weights has {len(w)} weights for {len(cfg.data_dir)} data_dir entries. Fix: one weight per dir, "
             f"e.g. data_weights={','.join(['1'] * len(cfg.data_dir))}")
    if any(not (x >= 0 and x < float("inf")) for x in w):
        _bad(f"data_weights={w}: a weight is negative or not a number. Fix: weights >= 0, e.g. 0.9,0.1")
    if w and sum(w) == 0:
        _bad(f"data_weights={w} are all 0: nothing to train on. Fix: give at least one source a weight > 0")
    sources = []
    for i, d in enumerate(cfg.data_dir):
        try:
            meta = read_meta(d)
            train = open_split(d, "train", meta)
            val = open_split(d, "val", meta) if (Path(d) / "val.tokens.bin").exists() else None
        except (FileNotFoundError, ValueError) as e:
            _bad(f"data_dir: {e}. Fix: (re)build it with `python -m data_preprocess.preprocess -o {d} ...` "
                 "or point data_dir at a preprocess output dir")
        if len(train) == 0:
            _bad(f"data_dir {d}: the train split has no blocks. Fix: preprocess more data or a smaller --max_len")
        if meta["mode"] != cfg.mode:
            _bad(f"mode={cfg.mode} but {d} holds '{meta['mode']}' shards. Fix: mode={meta['mode']} or point "
                 f"data_dir at {cfg.mode} shards")
        if val is None or len(val) == 0:
            _bad(f"data_dir {d}: the val split is empty (needed for validation loss). Fix: re-run "
                 "data_preprocess.preprocess with --val_ratio > 0 on at least 2 tunes/records (it then keeps at least "
                 "one for val; more data or a larger --val_ratio, e.g. 0.1, gives a bigger val split)")
        if sources:
            first = sources[0]
            m0 = first["meta"]
            h0, h = m0.get("tokenizer", {}).get("hash"), meta.get("tokenizer", {}).get("hash")
            if meta["vocab_size"] != m0["vocab_size"] or h != h0:
                _bad(f"data_dir {d} was made with another tokenizer (vocab {meta['vocab_size']}, hash {h}) than "
                     f"{first['dir']} (vocab {m0['vocab_size']}, hash {h0}): one model reads one tokenizer's ids. "
                     f"Fix: re-run data_preprocess on {d} with -t {Path(first['dir']) / 'tokenizer'}")
            if meta["max_len"] != m0["max_len"]:
                _bad(f"data_dir {d} has max_len {meta['max_len']} but {first['dir']} has {m0['max_len']}: a batch is "
                     f"blocks of one length. Fix: re-run data_preprocess on {d} with --max_len {m0['max_len']}")
        name = Path(resolved[i]).name or f"source{i}"
        if any(x["name"] == name for x in sources):
            name = f"{name}_{i}"
        sources.append({"name": name, "dir": d, "meta": meta, "train_blocks": len(train), "val_blocks": len(val),
                        "weight": (w[i] / sum(w)) if w else None})
    return sources

"""Build the model of a job: preset (random init) or HF dir/hub id, embedding resize, LoRA, param groups,
and the ZeRO memory estimate printed before the model exists."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from training.activations import estimate_activations, probe_layer
from training.attention import hf_attn_implementation
from training.checkpoint import gathered_state_dict
from training.config import TrainConfig, zero_stage
from training.fused_loss import unwrap_causal_lm
from training.presets import PRESETS, count_params, preset_config

log = logging.getLogger("tunesmith.train")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ModelInfo:
    source: str                      # preset name or HF dir / hub id
    from_preset: bool
    vocab_before: int
    vocab_after: int
    modules_to_save: list[str] = field(default_factory=list)
    # how LoRA treats a base with tied embed_tokens/lm_head whose embeddings are trained: "shared" (one matrix),
    # "untied" (two copies), "" when the base is not tied or the embeddings are not trained
    tied_embeddings: str = ""
    n_params: int = 0
    n_trainable: int = 0


def architecture_config(cfg: TrainConfig, tok):
    """The LlamaConfig (or HF config) of the job's model, without building the model."""
    if cfg.model in PRESETS:
        return preset_config(cfg.model, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.model)


def default_modules_to_save(cfg: TrainConfig, resized: bool) -> list[str]:
    if cfg.lora_modules_to_save is not None:
        return list(cfg.lora_modules_to_save)
    if cfg.mode == "pt" or resized:
        return ["embed_tokens", "lm_head"]
    return []


def build_model(cfg: TrainConfig, tok, precision: str, save_base_to=None, ds_config: dict | None = None,
                rank: int = 0) -> tuple[torch.nn.Module, ModelInfo]:
    """Returns the (PEFT-wrapped for LoRA) model in the training dtype, identical on every rank: on CPU, or for
    a preset on a machine with CUDA, on the current GPU.

    ``ds_config``: the filled DeepSpeed config of the job. Under ZeRO-3 the model is built inside
    ``deepspeed.zero.Init`` (transformers' ``HfDeepSpeedConfig`` route): every parameter is partitioned across
    the ranks as its module is created, so no rank ever holds the whole model (a 7B bf16 model is 13.5 GB per
    rank without it -- 108 GB of host memory for 8 ranks on a node). ``from_pretrained`` then loads each
    tensor into its partitions. Under ZeRO-3 every rank must call this (gathers are collectives).

    ``save_base_to``: a dir where the (resized) base model + tokenizer are saved (by ``rank`` 0) before LoRA wraps
    it -- the real base an adapter trained on a random-init preset needs for merging and inference."""
    dtype = DTYPES[precision]
    zero3 = ds_config is not None and zero_stage(ds_config) == 3
    hf_ds = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # while referenced, from_config/from_pretrained/resize use zero.Init
    try:
        model, info = _build(cfg, tok, dtype, zero3, save_base_to, rank)
    finally:
        if hf_ds is not None:  # later from_pretrained calls (export checks, tests) must load plain models again
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            del hf_ds
    return model, info


@torch.no_grad()
def init_preset_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """The random init of a preset, independent of how the model was built: every parameter is drawn from its
    own generator seeded by (``seed``, its name) -- LLaMA's scheme (linears and embeddings N(0, std), the
    padding row zero, norms one). So a preset starts from the same weights under zero.Init (ZeRO-3, any world
    size) as without it, whatever order or device the modules were created in (on one device type: a CUDA
    generator draws other numbers than the CPU one)."""
    import zlib

    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            shape = tuple(getattr(p, "ds_shape", p.shape))
            dev = p.device if p.device.type == "cuda" else torch.device("cpu")
            if "norm" in type(module).__name__.lower():
                val = torch.ones(shape) if pname == "weight" else torch.zeros(shape)
            elif pname == "bias":
                val = torch.zeros(shape)
            else:
                gen = torch.Generator(device=dev)
                gen.manual_seed((seed * 0x9E3779B1 + zlib.crc32(full.encode())) % 2**63)
                val = torch.empty(shape, dtype=torch.float32, device=dev).normal_(0.0, std, generator=gen)
                if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                    val[module.padding_idx] = 0
            with _whole(p):
                p.copy_(val.to(p.device, p.dtype))


@contextlib.contextmanager
def _whole(p: torch.nn.Parameter):
    """``p`` in full for an in-place edit: a ZeRO-3 partitioned parameter is gathered on every rank, rank 0's
    edit is broadcast and re-partitioned on exit (a collective); any other parameter is used as it is."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            yield
    else:
        yield


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitioned parameters report numel() == 0


def _build(cfg: TrainConfig, tok, dtype, zero3: bool, save_base_to, rank: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)  # the same RNG state on every rank (a preset's weights come from init_preset_weights)
    attn = hf_attn_implementation(cfg.attn_implementation)
    if cfg.model in PRESETS:
        mcfg = architecture_config(cfg, tok)
        if zero3:
            # zero.Init partitions each parameter as its module is created (the init below gathers them one by one)
            model = AutoModelForCausalLM.from_config(mcfg, attn_implementation=attn, dtype=dtype)
        elif torch.cuda.is_available():
            # on a GPU, initialise there, directly in the training dtype: a 7B preset is ~2 s instead of minutes of
            # CPU init plus a 28 GB fp32 copy (which would also break a capped --memory_fraction run)
            with torch.device("cuda", torch.cuda.current_device()):
                model = AutoModelForCausalLM.from_config(mcfg, attn_implementation=attn, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(mcfg, attn_implementation=attn,
                                                     dtype=torch.float32)
            model.to(dtype)
        init_preset_weights(model, cfg.seed, mcfg.initializer_range)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=False)
    info = ModelInfo(cfg.model, cfg.model in PRESETS, model.get_input_embeddings().num_embeddings, 0)
    resize_embeddings(model, len(tok))
    info.vocab_after = model.get_input_embeddings().num_embeddings
    model.config.use_cache = False
    model.config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.gradient_checkpointing_every)
    if save_base_to is not None:
        if zero3:
            sd = gathered_state_dict(model, rank=rank)  # collective: every rank gathers, rank 0 keeps
            if rank == 0:
                model.save_pretrained(str(save_base_to), state_dict=sd, safe_serialization=True)
        elif rank == 0:
            model.save_pretrained(str(save_base_to), safe_serialization=True)
        if rank == 0:
            tok.save_pretrained(str(save_base_to))
    if cfg.train_type == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.seed)  # adapters start the same however the base was built (zero.Init or not)

        info.modules_to_save = default_modules_to_save(cfg, info.vocab_after > info.vocab_before)
        tie = _tie_embeddings(model, cfg.tied_embeddings, info)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules), modules_to_save=list(info.modules_to_save) or None,
                          bias="none", task_type="CAUSAL_LM", ensure_weight_tying=tie)
        model = get_peft_model(model, lcfg)  # (PEFT rewrites the list it is given: hence the copy above)
    info.n_params = sum(_numel(p) for p in model.parameters())
    info.n_trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return model, info


def embeddings_tied(model) -> bool:
    """Whether ``model``'s lm_head weight is its input embedding matrix (one Parameter, not a copy)."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _tie_embeddings(model, how: str, info: ModelInfo) -> bool:
    """The LoRA decision for a tied base (``how``: shared | untie) whose embeddings are in modules_to_save.

    Left alone, PEFT copies only embed_tokens and lm_head keeps the base matrix: the run would train the input
    embeddings while the output head silently stays the original (and the merge unties them). So either one
    trained matrix is used as both (shared: PEFT's ensure_weight_tying -- both names are kept in modules_to_save
    so an adapter never lacks lm_head) or the model is untied here, before LoRA, so both copies train (untie).
    Records the choice in ``info.tied_embeddings``; returns the ``ensure_weight_tying`` flag for LoraConfig."""
    emb = {"embed_tokens", "lm_head"}
    if not (embeddings_tied(model) and emb & set(info.modules_to_save)):
        return False
    if how == "untie":
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
        info.tied_embeddings = "untied"
    else:
        info.tied_embeddings = "shared"
    info.modules_to_save = list(dict.fromkeys([*info.modules_to_save, *sorted(emb)]))
    log.info("tied embeddings: %s", "one shared matrix trained as embed_tokens and lm_head (tied_embeddings=shared)"
             if how != "untie" else "untied on purpose: embed_tokens and lm_head train as two copies "
             "(tied_embeddings=untie)")
    return how != "untie"


def enable_checkpointing(model, every: int = 1) -> list[int]:
    """Gradient (activation) checkpointing of 1 in every ``every`` decoder layers (layer i is recomputed in
    backward iff ``i % every == 0``); the other layers keep their activations. Non-reentrant, so frozen bases
    (LoRA) need no input-grad hooks. Returns the indices of the checkpointed layers."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    chosen = []
    for i, layer in enumerate(unwrap_causal_lm(model).get_decoder().layers):
        layer.gradient_checkpointing = i % every == 0
        if layer.gradient_checkpointing:
            chosen.append(i)
    return chosen


def compile_decoder_layers(model) -> int:
    """``torch.compile`` every decoder layer in place (parameter names, checkpoints and PEFT are unchanged; the
    layers share one compiled graph). The embedding, final norm, lm_head and loss stay eager. Returns the count."""
    layers = unwrap_causal_lm(model).get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


@torch.no_grad()
def resize_embeddings(model, n_tokens: int) -> None:
    """Grows input and output embeddings to ``n_tokens``; new rows = the mean of the old rows (a neutral
    start: the new token's logit begins at the average of the existing ones)."""
    old = model.get_input_embeddings().num_embeddings
    if n_tokens <= old:
        return
    model.resize_token_embeddings(n_tokens, mean_resizing=False)
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is None:
            continue
        with _whole(emb.weight):
            emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)
    log.warning("resized embeddings %d -> %d tokens (the tokenizer has %d new tokens; new rows = mean embedding)",
                old, n_tokens, n_tokens - old)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (ndim >= 2) only, never on norms or biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _estimate_activations(cfg: TrainConfig, mcfg, seq_len: int, precision: str, device: str) -> dict:
    dtype = DTYPES[precision]
    lora = None
    if cfg.train_type == "lora":
        lora = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                "target_modules": [m for m in cfg.lora_target_modules if m != "lm_head"]}
    probe_dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    layer = probe_layer(mcfg, dtype, hf_attn_implementation(cfg.attn_implementation), lora, probe_dev)
    chunked = cfg.loss != "hf" and not (cfg.train_type == "lora" and "lm_head" in cfg.lora_target_modules)
    est = estimate_activations(layer, mcfg.num_hidden_layers, seq_len, cfg.micro_batch_size,
                               cfg.gradient_checkpointing_every if cfg.gradient_checkpointing else None,
                               mcfg.vocab_size, "chunked" if chunked else "hf", cfg.loss_chunk_size,
                               torch.finfo(dtype).bits // 8)
    ck = (f"checkpointing every {cfg.gradient_checkpointing_every} layer(s): {est['checkpointed_layers']} of "
          f"{mcfg.num_hidden_layers}" if cfg.gradient_checkpointing else "no gradient checkpointing")
    print(f"[memory] activations of one micro-batch ({cfg.micro_batch_size} x {seq_len} tokens, {precision}, {ck}, "
          f"{'chunked' if chunked else 'HF logits'} loss): about {est['total_bytes'] / 2**30:.2f} GiB per device "
          f"(layers {est['layers_bytes'] / 2**30:.2f}, loss {est['loss_bytes'] / 2**30:.2f}; "
          f"{layer.per_token / 1024:.1f} KiB per token per layer, measured on a 1/2-layer probe)")
    return est


# ------------------------------------------------------------------------------------------------
# ZeRO memory estimate (before the model is built), and what to say when a job runs out of memory
# ------------------------------------------------------------------------------------------------
MEMORY_FIXES = ("gradient_checkpointing=true (or a smaller gradient_checkpointing_every), a smaller micro_batch_size "
                "(global_batch_size stays: accumulation grows), a higher ZeRO stage, an *_offload ds_config, LoRA, "
                "or more GPUs")


def memory_fixes(cfg: TrainConfig | None, estimate: dict | None = None) -> str:
    """What to change when a job does not fit, the likeliest first: with the HF logits loss taking most of the
    estimated activations, ``loss=chunked``; else :data:`MEMORY_FIXES`."""
    act = (estimate or {}).get("activations") or {}
    if cfg is not None and cfg.loss == "hf" and act.get("loss_bytes", 0) > act.get("layers_bytes", 0):
        return (f"loss=chunked (the HF loss's full logits are ~{act['loss_bytes'] / 2**30:,.1f} GiB of the estimate), "
                + MEMORY_FIXES)
    return MEMORY_FIXES


def estimate_memory(cfg: TrainConfig, tok, stage: int, off_opt: bool, off_par: bool, world: int,
                    gpus_per_node: int, device_mem_bytes: int | None, seq_len: int | None = None,
                    precision: str = "fp32", device: str = "cpu") -> dict:
    """Prints DeepSpeed's model-state memory table for this model, then the activation memory of one
    micro-batch (measured on a 1/2-layer probe of the architecture, :mod:`training.activations`), and warns
    when states + activations exceed the device. Returns the figures.

    DeepSpeed's formulas assume every parameter is trained; for LoRA we also report the need with only
    the adapter (+ modules_to_save) trained: 16-bit weights + 18 bytes per trainable parameter / world."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    try:
        mcfg = architecture_config(cfg, tok)
    except Exception as e:  # noqa: BLE001 - a hub id offline: the estimate is informative only
        log.warning("memory estimate skipped: cannot read the model config of %s (%s)", cfg.model, e)
        return {}
    vocab = max(len(tok), mcfg.vocab_size)
    mcfg.vocab_size = vocab
    counts = count_params(mcfg)
    total = counts["total"]
    h, inter = mcfg.hidden_size, mcfg.intermediate_size
    largest = max(vocab * h, 4 * h * h + 3 * h * inter)
    nodes = max(1, world // max(1, gpus_per_node))
    per_node = min(world, max(1, gpus_per_node))
    print(f"[memory] model {cfg.model}: {total / 1e6:.1f} M parameters, largest layer {largest / 1e6:.1f} M; "
          f"ZeRO-{stage}, {world} rank(s), offload optimizer={off_opt} params={off_par}")
    if stage == 3:
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=per_node, num_nodes=nodes)
        cpu, dev, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, cpu_offload=off_opt,
                                                            cpu_offload_params=off_par, zero_init=True)
    else:
        estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=per_node, num_nodes=nodes)
        # ZeRO-0/1 partition less than ZeRO-2: estimate them as ZeRO-2 on 1 rank (no partitioning) / as ZeRO-2
        cpu, dev = estimate_zero2_model_states_mem_needs(total, per_node if stage else 1, nodes if stage else 1,
                                                         cpu_offload=off_opt)
    out = {"params": total, "stage": stage, "device_bytes": dev, "cpu_bytes": cpu}
    if cfg.train_type == "lora":
        kv = h * mcfg.num_key_value_heads // mcfg.num_attention_heads
        in_out = {"q_proj": 2 * h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": 2 * h,
                  "gate_proj": h + inter, "up_proj": h + inter, "down_proj": h + inter}
        per_layer = sum(in_out.get(m, 2 * h) for m in cfg.lora_target_modules) * cfg.lora_r  # r * (in + out)
        trainable = per_layer * mcfg.num_hidden_layers
        mts = cfg.lora_modules_to_save if cfg.lora_modules_to_save is not None else (
            ["embed_tokens", "lm_head"] if cfg.mode == "pt" else [])
        n_emb = len([m for m in mts if m in ("embed_tokens", "lm_head")])
        if n_emb and getattr(mcfg, "tie_word_embeddings", False) and cfg.tied_embeddings == "shared":
            n_emb = 1  # one shared matrix (see _tie_embeddings)
        trainable += vocab * h * n_emb
        dev = 2 * total / (world if stage == 3 else 1) + 18 * trainable / (world if stage >= 1 else 1)
        out.update(trainable=trainable, device_bytes_lora=int(dev))
        print(f"[memory] LoRA: {trainable / 1e6:.1f} M trainable -> about {dev / 2**30:.2f} GiB of model states per "
              "device (activations below)")
    act = 0
    if seq_len:
        try:
            act = _estimate_activations(cfg, mcfg, seq_len, precision, device)
            out["activations"] = act
            act = act["total_bytes"]
        except Exception as e:  # noqa: BLE001 - an architecture the probe cannot build: the estimate is informative
            log.warning("[memory] activation estimate skipped: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
    need = dev + act
    out["device_bytes_total"] = int(need)
    if device_mem_bytes and need > 0.9 * device_mem_bytes:
        log.warning("[memory] model states (~%.1f GiB) + activations (~%.1f GiB) need about %.1f GiB per %s but "
                    "it has %.1f GiB: this will not fit. Try %s.", dev / 2**30, act / 2**30, need / 2**30,
                    "device" if device == "cuda" else "rank (its share of this host's memory)",
                    device_mem_bytes / 2**30, memory_fixes(cfg, out))
        out["fits"] = False
    else:
        out["fits"] = True
    return out


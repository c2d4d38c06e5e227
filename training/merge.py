"""Turn training output into a plain Hugging Face model directory, and prove it is the same model.

Two sources:

    # a PEFT LoRA adapter + its base (ChatMusician's flags --ori_model_dir / --model_dir also work)
    python training/merge.py --base_model BASE --lora_model OUTPUT_DIR/final --output_dir merged [--dtype bf16]

    # a DeepSpeed checkpoint of any ZeRO stage (0-3), full or LoRA training (tunesmith's checkpoint layout)
    python training/merge.py --deepspeed_checkpoint OUTPUT_DIR/checkpoints[/step-00000100] --output_dir merged

The output holds sharded safetensors, the tokenizer with its chat template and a generation config
(eos, pad != eos, ChatMusician's sampling defaults): it loads with ``AutoModelForCausalLM`` alone.

Details that broke ChatMusician users' merges are handled: a tokenizer with more tokens than the base
(pad or music tokens added in training) -> the base is resized to the adapter's embedding rows before the
adapter is attached; ``modules_to_save`` copies (embed_tokens, lm_head) replace the base modules.

Self-check: logits of the adapter (or DeepSpeed) model on a probe batch are compared with (1) the model
merged in memory and (2) the output directory reloaded from disk with plain transformers. The max abs
differences are printed and written to ``merge_info.json``; above the dtype's tolerance the command fails
and leaves the output as ``OUTPUT_DIR.unverified``. The output is written to a temporary sibling first,
so an interrupted merge never leaves a half-written model under the final name.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python training/merge.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data_preprocess.chat_format import ensure_chat_template
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from training.hf_io import (
    ModelPathError,
    has_tokenizer,
    load_tokenizer,
    resize_for_adapter,
    resolve_model_path,
    unloadable_is_a_path_error,
)
from training.model import embeddings_tied, resize_embeddings
from training.presets import is_preset, preset_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# max |logit difference| allowed, relative to max(1, max |reference logit|): the merge is W + s*B@A
# computed once instead of per token, so only rounding of the output dtype separates the two.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
PROBE_TEXTS = (
    "Human: Compose a jig in D major. </s> Assistant: ",
    "X:1\nT:Probe\nM:6/8\nL:1/8\nK:D\n|:dAF A2B|c3 d2e|fed cBA|d3 d3:|\n",
    "Human: Explain what the K: field of an ABC tune means. </s> Assistant: It sets the key",
)
# ChatMusician's sampling settings, written into generation_config.json of the merged model
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_k": 40, "top_p": 0.9,
                       "repetition_penalty": 1.1, "max_new_tokens": 1536}


def log(msg: str):
    print(f"[merge] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# output directory handling


def prepare_output(out: Path, overwrite: bool, inputs: list[Path]) -> Path:
    """Checks the output dir may be written; returns the temporary sibling to write into."""
    out = out.resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ArgumentError(f"--output_dir {out} overlaps the input {src}; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ArgumentError(f"--output_dir {out} is not empty; pass --overwrite to replace it")
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def publish(tmp: Path, out: Path, ok: bool) -> Path:
    """Moves the finished temp dir to ``out`` (or ``out.unverified`` when the self-check failed)."""
    final = out if ok else out.with_name(out.name + ".unverified")
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    tmp.rename(final)
    return final


# ----------------------------------------------------------------------------------------------------
# probing


def probe_batches(tok, vocab_rows: int, base_rows: int) -> list[torch.Tensor]:
    """Token id rows for the logit check: chat + ABC text, plus the tokens added over the base (their
    embedding rows come from the adapter, the part of a merge most likely to go wrong)."""
    rows = [torch.tensor([tok(t).input_ids[:96]]) for t in PROBE_TEXTS]
    if vocab_rows > base_rows:
        added = list(range(base_rows, vocab_rows))[:32]
        text_ids = tok(PROBE_TEXTS[1]).input_ids[:16]
        rows.append(torch.tensor([text_ids + added + text_ids]))
    return rows


@torch.inference_mode()
def probe_logits(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=b).logits.float().cpu() for b in batches]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], dtype: torch.dtype) -> dict:
    """Max abs difference over the reference's vocabulary columns, and the tolerance for ``dtype``."""
    diff = max((r - g[..., : r.shape[-1]]).abs().max().item() for r, g in zip(ref, got, strict=True))
    scale = max(1.0, max(r.abs().max().item() for r in ref))
    tol = TOLERANCE[dtype] * scale
    return {"max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol, "dtype": str(dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------------------------------
# building the model to merge


def pick_compute_dtype(out_dtype: torch.dtype, weight_bytes_fp32: int) -> torch.dtype:
    """Merge in fp32 when it fits in memory (exact check), else in the output dtype."""
    if out_dtype == torch.float32:
        return out_dtype
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a dependency
        return out_dtype
    return torch.float32 if weight_bytes_fp32 * 2.2 < avail else out_dtype


def weight_bytes_fp32(model_dir: str) -> int:
    """fp32 size of the weights in an HF dir (from the files; 0 for a hub id)."""
    p = Path(model_dir)
    if not p.is_dir():
        return 0
    total = sum(f.stat().st_size for f in p.glob("*.safetensors")) or sum(f.stat().st_size for f in p.glob("*.bin"))
    try:
        cfg = json.loads((p / "config.json").read_text())
        stored = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    except (OSError, json.JSONDecodeError):
        stored = "float32"
    return total * (2 if ("16" in stored) else 1)


def default_out_dtype(model_dir: str | None, meta: dict | None = None) -> str:
    """``auto``: the dtype the model was stored / trained in (fp32 when unknown)."""
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
    if meta and str(meta.get("dtype")) in names:
        return names[str(meta["dtype"])]
    if model_dir and (Path(model_dir) / "config.json").is_file():
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return names.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), "fp32")
    return "fp32"


def load_adapter_model(base_model: str, lora_model: str, tokenizer_path: str | None, dtype: torch.dtype):
    """Base (resized to the adapter's vocabulary) + PEFT adapter, in ``dtype`` on CPU (paths checked by
    :func:`training.hf_io.resolve_model_path` first)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok_src = tokenizer_path or (lora_model if has_tokenizer(lora_model) else base_model)
    with unloadable_is_a_path_error("tokenizer" if tokenizer_path else "model", tok_src):
        tok = load_tokenizer(tok_src)
    with unloadable_is_a_path_error("model", base_model):
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, trust_remote_code=False)
    base_rows = base.get_input_embeddings().weight.shape[0]
    rows = resize_for_adapter(base, tok, lora_model)
    if rows != base_rows:
        log(f"resized base embeddings {base_rows} -> {rows} rows (tokenizer: {len(tok)} tokens)")
    if len(tok) > rows:
        raise ArgumentError(f"{tok_src}: tokenizer has {len(tok)} tokens but the adapter's embeddings have {rows} rows; "
                         "pass the tokenizer the adapter was trained with (--tokenizer_path)")
    try:
        model = PeftModel.from_pretrained(base, lora_model)
    except (ValueError, RuntimeError, KeyError) as e:   # target modules missing, shape mismatch: another model
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelPathError(f"adapter {lora_model} does not fit base {base_model} ({base.config.model_type}, "
                             f"{base.config.hidden_size} hidden): {type(e).__name__}: {why}. Fix: pass the base the "
                             "adapter was trained on (its adapter_config.json names it: base_model_name_or_path)") from None
    return model, tok, base_rows


def adapter_fingerprint(lora_model: str) -> str:
    """sha256 of the adapter's weights file: the identity of an adapter, wherever it was copied to."""
    import hashlib

    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        f = Path(lora_model) / name
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for piece in iter(lambda: fh.read(1 << 20), b""):
                    h.update(piece)
            return h.hexdigest()
    return ""


def applied_adapters(base_model: str) -> list[dict]:
    """The adapters already merged into ``base_model`` (its merge_info.json, written by this tool), oldest first."""
    f = Path(base_model) / "merge_info.json"
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(info, dict):
        return []
    if isinstance(info.get("adapters"), list):
        return [a for a in info["adapters"] if isinstance(a, dict)]
    return [{"path": info["lora_model"], "sha256": ""}] if info.get("source") == "lora" and info.get("lora_model") else []


def refuse_adapter_twice(base_model: str, lora_model: str, sha: str) -> None:
    """A base that already holds this adapter (same weights sha, or same path when no sha was recorded) would
    get the LoRA delta twice: one-line :class:`ModelPathError`."""
    import os

    for a in applied_adapters(base_model):
        same = (sha and a.get("sha256") == sha) or (not a.get("sha256") and
                                                     os.path.realpath(str(a.get("path", ""))) == os.path.realpath(lora_model))
        if same:
            raise ModelPathError(f"base {base_model} already holds adapter {lora_model} (merged from {a.get('path')}, "
                                 f"see {Path(base_model) / 'merge_info.json'}): merging again would apply the LoRA twice. "
                                 "Fix: pass the original base (adapter_config.json: base_model_name_or_path)")


# DeepSpeed checkpoints ------------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> tuple[Path, str, Path]:
    """``OUTPUT_DIR``, ``OUTPUT_DIR/checkpoints`` or ``.../checkpoints/step-N`` -> (checkpoints dir, tag, ckpt dir)."""
    p = Path(path)
    if (p / "tunesmith.json").is_file():
        return p.parent, p.name, p
    for cdir in (p, p / "checkpoints"):
        if (cdir / "latest").is_file():
            tag = (cdir / "latest").read_text().strip()
            if not (cdir / tag / "tunesmith.json").is_file():
                raise ArgumentError(f"{cdir / 'latest'} names {tag!r} but {cdir / tag / 'tunesmith.json'} is missing")
            return cdir, tag, cdir / tag
    raise ArgumentError(f"{path}: not a tunesmith checkpoint (need step-*/tunesmith.json, or checkpoints/latest)")


def _resolve_path(value: str | None, ckpt_dir: Path) -> str | None:
    """A path recorded in tunesmith.json: as written, else relative to the checkpoint / output dir."""
    if not value:
        return None
    for cand in (Path(value), ckpt_dir / value, ckpt_dir.parent.parent / value):
        if cand.exists():
            return str(cand)
    return value  # maybe a hub id


def _lora_config(meta: dict, where: Path):
    from peft import LoraConfig

    lc = meta.get("lora") or meta.get("lora_config")
    if not isinstance(lc, dict):
        raise ArgumentError(f"{where}: train_type is lora but field 'lora' (r, alpha, dropout, target_modules, "
                         "modules_to_save) is missing")

    def get(*names, default=None):
        for n in names:
            if n in lc:
                return lc[n]
        if default is not None:
            return default
        raise ArgumentError(f"{where}: field 'lora.{names[0]}' is missing")

    return LoraConfig(r=int(get("r", "lora_r")), lora_alpha=get("alpha", "lora_alpha"),
                      lora_dropout=float(get("dropout", "lora_dropout", default=0.0)),
                      target_modules=list(get("target_modules", "lora_target_modules")),
                      modules_to_save=get("modules_to_save", "lora_modules_to_save", default=[]) or None,
                      bias="none", task_type="CAUSAL_LM")


def refuse_unsafe_torch_files(ckpt_dir: Path) -> None:
    """Every ``*.pt`` of a checkpoint must load with ``torch.load(weights_only=True)`` (tensors, numbers, strings,
    plain containers): a pickle naming any other callable could run code, and checkpoints get passed around.
    DeepSpeed's own ZeRO reader (``zero_to_fp32``) unpickles with ``weights_only=False``; running it only on files
    that passed this check means it meets nothing but what the safe loader allows. Raises SystemExit (one line)."""
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # the only non-tensor objects DeepSpeed's ZeRO optimizer states pickle: an enum and plain state holders
    # (rebuilt from their attribute dicts, no code of theirs runs; fragment_address: ZeRO-1/2's (numel, start))
    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    for f in sorted(ckpt_dir.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError) as e:
            why = str(e).strip().splitlines()[0][:200]
            raise ArgumentError(f"{f}: refused -- it does not load with torch.load(weights_only=True), so it may "
                             f"run code when unpickled ({why}). Fix: convert only checkpoints you trust, with their "
                             "own tools; tunesmith never unpickles arbitrary objects") from None


def deepspeed_state_dict(checkpoints_dir: Path, tag: str, ckpt_dir: Path, zero_stage: int | None) -> dict:
    """fp32 weights of the engine's module for any ZeRO stage (stage 0 keeps them in the model file)."""
    refuse_unsafe_torch_files(ckpt_dir)
    if any(ckpt_dir.glob("*zero_pp_rank_*optim_states.pt")) and zero_stage != 0:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir), tag=tag)
    files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ArgumentError(f"{ckpt_dir}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}


def load_deepspeed_model(path: str, tokenizer_path: str | None, dtype: torch.dtype):
    """Rebuilds the trained model from ``tunesmith.json`` and loads the checkpoint's fp32 weights.

    Returns (model, tokenizer, base_rows, meta) where model is a PeftModel for LoRA runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoints_dir, tag, ckpt_dir = resolve_checkpoint(path)
    meta = json.loads((ckpt_dir / "tunesmith.json").read_text())
    where = ckpt_dir / "tunesmith.json"
    for key in ("model_source", "train_type"):
        if key not in meta:
            raise ArgumentError(f"{where}: field {key!r} is missing")
    tok_field = meta.get("tokenizer_dir") or meta.get("tokenizer")
    tok_field = tok_field.get("path") if isinstance(tok_field, dict) else tok_field
    tok_src = tokenizer_path or _resolve_path(tok_field, ckpt_dir)
    if not tok_src or not has_tokenizer(tok_src):
        tok_src = str(ckpt_dir / "hf") if has_tokenizer(ckpt_dir / "hf") else tok_src
    if not tok_src:
        raise ArgumentError(f"{where}: no tokenizer recorded; pass --tokenizer_path")
    tok = load_tokenizer(tok_src)
    vocab = int(meta.get("vocab_size") or len(tok))
    source = meta["model_source"]
    lora = meta["train_type"] == "lora"
    base_dir = _resolve_path(meta.get("base_model_dir"), ckpt_dir) if lora else None
    log(f"checkpoint {ckpt_dir} (tag {tag}, step {meta.get('global_step')}, ZeRO-{meta.get('zero_stage')}, "
        f"{meta['train_type']}, model {source})")

    if base_dir and Path(base_dir).is_dir():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=False)
        have_base = True
    else:
        if is_preset(source):
            cfg = preset_config(source, vocab_size=vocab, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        else:
            cfg = AutoConfig.from_pretrained(_resolve_path(source, ckpt_dir), trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        have_base = False
    base_rows = model.get_input_embeddings().weight.shape[0]
    resize_embeddings(model, vocab)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(meta, where))
    sd = deepspeed_state_dict(checkpoints_dir, tag, ckpt_dir, meta.get("zero_stage"))
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise ArgumentError(f"{ckpt_dir}: checkpoint has weights the rebuilt model lacks, e.g. "
                         f"{result.unexpected_keys[:3]} (does tunesmith.json describe this run?)")
    trained_missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k or not lora]
    if trained_missing or (result.missing_keys and not have_base):
        miss = trained_missing or result.missing_keys
        raise ArgumentError(f"{ckpt_dir}: checkpoint lacks {len(miss)} weights, e.g. {miss[:3]}"
                         + ("" if have_base else "; the frozen base is not in it and base_model_dir is missing"))
    log(f"loaded {len(sd)} tensors from the DeepSpeed checkpoint"
        + (f" ({len(result.missing_keys)} frozen base weights from {base_dir})" if result.missing_keys else ""))
    del sd
    gc.collect()
    return model, tok, base_rows, meta


# ----------------------------------------------------------------------------------------------------
# save + verify


def save_hf(model, tok, out: Path, dtype: torch.dtype, max_shard_size: str):
    """Sharded safetensors + tokenizer (with chat template) + generation config."""
    from transformers import GenerationConfig

    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ArgumentError("the tokenizer's pad token equals eos (or is missing): generation would stop on padding; "
                         "re-save the tokenizer with a distinct pad token")
    model.to(dtype)
    cfg = model.config
    cfg.vocab_size = model.get_input_embeddings().weight.shape[0]
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cfg.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, **GENERATION_DEFAULTS)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    ensure_chat_template(tok)  # the chat format the model was trained in (ChatMusician's when none)
    tok.save_pretrained(out)


def merge_and_save(model, tok, base_rows: int, out: Path, tmp: Path, out_dtype: torch.dtype, compute: torch.dtype,
                   max_shard_size: str, info: dict) -> int:
    from transformers import AutoModelForCausalLM

    is_peft = hasattr(model, "merge_and_unload")
    rows = model.get_input_embeddings().weight.shape[0]
    batches = probe_batches(tok, rows, base_rows)
    t0 = time.time()
    ref = probe_logits(model, batches)
    checks = {}
    if is_peft:
        model = model.merge_and_unload()  # a tied base trained with tied_embeddings=shared stays tied
        checks["in_memory"] = compare(ref, probe_logits(model, batches), compute)
        log(f"merged in {str(compute).replace('torch.', '')}: max |logit diff| vs adapter model "
            f"{checks['in_memory']['max_abs_diff']:.3g} (tolerance {checks['in_memory']['tolerance']:.3g})")
    tied = embeddings_tied(model)
    log(f"embeddings: {'tied (one matrix as embed_tokens and lm_head)' if tied else 'untied'}")
    save_hf(model, tok, tmp, out_dtype, max_shard_size)
    del model
    gc.collect()
    # the files on disk, read back by plain transformers, must be the same model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=out_dtype, trust_remote_code=False)
    checks["reloaded"] = compare(ref, probe_logits(reloaded, batches), out_dtype)
    vocab_ok = reloaded.get_input_embeddings().weight.shape[0] >= len(tok)
    del reloaded
    log(f"reloaded {tmp.name} ({str(out_dtype).replace('torch.', '')}): max |logit diff| vs "
        f"{'adapter' if is_peft else 'checkpoint'} model {checks['reloaded']['max_abs_diff']:.3g} "
        f"(tolerance {checks['reloaded']['tolerance']:.3g})")
    ok = all(c["ok"] for c in checks.values()) and vocab_ok
    info.update(checks=checks, verified=ok, tied_embeddings=tied, vocab_rows=rows, base_rows=base_rows, tokenizer_tokens=len(tok),
                probe_sequences=len(batches), dtype=str(out_dtype).replace("torch.", ""),
                merge_dtype=str(compute).replace("torch.", ""), seconds=round(time.time() - t0, 2))
    (tmp / "merge_info.json").write_text(json.dumps(info, indent=2))
    final = publish(tmp, out, ok)
    if not ok:
        why = "embedding rows < tokenizer size" if not vocab_ok else "logits differ beyond tolerance"
        log(f"FAILED self-check ({why}); output kept for inspection at {final}")
        return 1
    log(f"wrote {final} (verified: its logits equal the {'adapter' if is_peft else 'checkpoint'} model's "
        "within tolerance)")
    print(json.dumps({"output_dir": str(final), **{k: v["max_abs_diff"] for k, v in checks.items()}}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Merge a LoRA adapter, or convert a DeepSpeed checkpoint, into an "
                                 "HF model dir (self-verified).")
    src = ap.add_argument_group("source (either base+adapter or a DeepSpeed checkpoint)")
    src.add_argument("--base_model", "--ori_model_dir", dest="base_model", help="HF dir (or hub id) of the base model")
    src.add_argument("--lora_model", "--model_dir", dest="lora_model", help="PEFT adapter dir (OUTPUT_DIR/final)")
    src.add_argument("--deepspeed_checkpoint", help="OUTPUT_DIR, OUTPUT_DIR/checkpoints (uses 'latest') or "
                     "OUTPUT_DIR/checkpoints/step-N")
    src.add_argument("--tokenizer_path", help="default: the adapter's / checkpoint's tokenizer")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="dtype of the saved weights (auto: the base's / training dtype)")
    ap.add_argument("--max_shard_size", default="2GB", help="safetensors shard size, e.g. 2GB, 500MB")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return ap


@exit_on_argument_error
def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    out = Path(a.output_dir)
    if a.deepspeed_checkpoint:
        if a.base_model or a.lora_model:
            ap.error("--deepspeed_checkpoint reads the base from tunesmith.json; drop --base_model/--lora_model")
        _, _, ckpt_dir = resolve_checkpoint(a.deepspeed_checkpoint)
        meta = json.loads((ckpt_dir / "tunesmith.json").read_text())
        out_dtype = DTYPES[a.dtype if a.dtype != "auto" else default_out_dtype(None, meta)]
        tmp = prepare_output(out, a.overwrite, [ckpt_dir])
        compute = torch.float32  # the checkpoint's master weights are fp32
        model, tok, base_rows, meta = load_deepspeed_model(a.deepspeed_checkpoint, a.tokenizer_path, compute)
        info = {"source": "deepspeed", "checkpoint": str(ckpt_dir), "tunesmith": meta}
    else:
        if not (a.base_model and a.lora_model):
            ap.error("give --base_model and --lora_model (or --deepspeed_checkpoint)")
        # a wrong path fails here, in one line, before anything is written
        a.base_model, a.lora_model = resolve_model_path(a.base_model, "model"), resolve_model_path(a.lora_model, "adapter")
        a.tokenizer_path = a.tokenizer_path and resolve_model_path(a.tokenizer_path, "tokenizer")
        sha = adapter_fingerprint(a.lora_model)
        refuse_adapter_twice(a.base_model, a.lora_model, sha)
        out_dtype = DTYPES[a.dtype if a.dtype != "auto" else default_out_dtype(a.base_model)]
        inputs = [Path(a.lora_model)] + ([Path(a.base_model)] if Path(a.base_model).exists() else [])
        tmp = prepare_output(out, a.overwrite, inputs)
        compute = pick_compute_dtype(out_dtype, weight_bytes_fp32(a.base_model))
        model, tok, base_rows = load_adapter_model(a.base_model, a.lora_model, a.tokenizer_path, compute)
        info = {"source": "lora", "base_model": a.base_model, "lora_model": a.lora_model, "adapter_sha256": sha,
                "adapters": [*applied_adapters(a.base_model), {"path": a.lora_model, "sha256": sha}]}
    try:
        return merge_and_save(model, tok, base_rows, out, tmp, out_dtype, compute, a.max_shard_size, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())

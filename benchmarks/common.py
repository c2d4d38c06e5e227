"""Shared machinery of the evaluators: typed configs, model loading, batched log-likelihood scoring,
batched generation, result files and markdown tables.

Every benchmark is a dataclass config + a ``run(cfg) -> dict`` function; ``parse_config`` builds the CLI
from the dataclass (``--field value`` flags, ``--config file.yaml|json``, trailing ``key=value``
overrides; precedence: defaults < config file < flags < overrides).

Log-likelihood scoring follows lm-evaluation-harness: context and continuation are tokenised *jointly*
and split at the length of the tokenised context (so a space that BPE merges into the continuation is
scored as part of it), inputs are right-padded, and a request's score is the sum of the log-probs of its
continuation tokens. Requests whose model input is identical (e.g. the four one-token answer letters of
an MMLU question after the same prompt) share one forward pass.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data_preprocess.config import ConfigError, convert, field_docs, field_types, parse_bool
from data_preprocess.config import load_file as load_config_file
from data_preprocess.hub import ArgumentError
from inference.abc_constraint import constraint_processor
from inference.loading import load_model

# --------------------------------------------------------------------------------------------- config


def _bool(s: str | bool) -> bool:
    """argparse ``type=`` for booleans: true/false/yes/no/1/0/on/off."""
    try:
        return parse_bool(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_BOOL_WORDS = {"1", "0", "true", "false", "yes", "no", "y", "n", "on", "off"}


def _expand_bool_flags(bools: set[str], argv: list[str]) -> list[str]:
    """``--x`` alone -> ``--x=true``, ``--no-x`` -> ``--x=false`` for the bool fields ``bools``; ``--x false`` is
    left as is."""
    out = []
    for i, a in enumerate(argv):
        name = a[2:] if a.startswith("--") and "=" not in a else None
        if name in bools and not (i + 1 < len(argv) and argv[i + 1].lower() in _BOOL_WORDS):
            out.append(f"--{name}=true")
        elif name and name.startswith("no-") and name[3:] in bools:
            out.append(f"--{name[3:]}=false")
        else:
            out.append(a)
    return out


def _embedded(cls) -> tuple[str, type] | None:
    """The one field of ``cls`` whose type is itself a config dataclass (e.g. the throughput benchmark's
    ``train: TrainConfig``), as (name, class), or None."""
    for name, t in field_types(cls).items():
        if dataclasses.is_dataclass(t):
            return name, t
    return None


def parse_config(cls, argv: list[str] | None = None, description: str = ""):
    """CLI for dataclass ``cls``: ``--name value`` per field, ``--config FILE`` and ``key=value``.

    A field whose type is a dataclass embeds that config (the throughput benchmark embeds the training job's
    ``TrainConfig``): its fields are flags and ``key=value`` keys of this same CLI (a config file gives them
    flat, or as a mapping under the field's name), set on the field's default instance."""
    emb = _embedded(cls)
    sub_names = {f.name for f in dataclasses.fields(emb[1])} if emb else set()
    own = [f for f in dataclasses.fields(cls) if not emb or f.name != emb[0]]
    own_names = {f.name for f in own}
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML or JSON file with any of the options below")
    groups = [(cls, own, ap, None)]
    if emb:
        sub = [f for f in dataclasses.fields(emb[1]) if f.name not in own_names]
        sub_default = next(f for f in dataclasses.fields(cls) if f.name == emb[0]).default_factory()
        groups.append((emb[1], sub, ap.add_argument_group(f"{emb[0]}: the embedded {emb[1].__name__}"), sub_default))
    bools = set()
    for owner, fields_, group, instance in groups:
        types, docs = field_types(owner), field_docs(owner)
        for f in fields_:
            if instance is not None:
                default = getattr(instance, f.name)
            else:
                default = f.default if f.default is not dataclasses.MISSING else None
            kw = {"dest": f.name, "default": argparse.SUPPRESS,
                  "help": f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")}
            if types[f.name] is bool:
                bools.add(f.name)
                group.add_argument(f"--{f.name}", type=_bool, **kw)  # --x, --x true|false, --no-x (see below)
            else:
                group.add_argument(f"--{f.name}", type=str, **kw)
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied last")
    ns = vars(ap.parse_args(_expand_bool_flags(bools, sys.argv[1:] if argv is None else list(argv))))
    cfg_file, overrides = ns.pop("config", None), ns.pop("overrides", None) or []
    # each source is routed by key: a field of cls, else a field of the embedded config
    file_vals = dict(load_config_file(cfg_file)) if cfg_file else {}
    if emb and isinstance(file_vals.get(emb[0]), dict):
        file_vals = {**file_vals.pop(emb[0]), **file_vals}
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value. Fix: e.g. steps=20 lr=1e-4")
        pairs.append(item.split("=", 1))

    def routed(to_sub: bool) -> dict:
        def mine(k):
            return (k in sub_names and k not in own_names) if to_sub else not (emb and k in sub_names and k not in own_names)
        where = cfg_file or ""
        values = {k: convert(emb[1] if to_sub else cls, k, v, where) for k, v in file_vals.items() if mine(k)}
        values.update({k: convert(emb[1] if to_sub else cls, k, v, f"--{k}") for k, v in ns.items() if mine(k)})
        values.update({k.strip(): convert(emb[1] if to_sub else cls, k.strip(), v, f"override '{k}={v}'")
                       for k, v in pairs if mine(k.strip())})
        return values

    values = routed(False)
    missing = [f.name for f in own
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join('--' + m for m in missing)}. Fix: give them")
    cfg = cls(**values)
    if emb:
        sub_values = routed(True)
        setattr(cfg, emb[0], dataclasses.replace(getattr(cfg, emb[0]), **sub_values))
        if hasattr(cfg, "fill_embedded"):  # e.g. a default that follows another field unless given itself
            cfg.fill_embedded(set(sub_values))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


@dataclass
class ModelArgs:
    """Options every model-based benchmark shares."""

    model: str = None
    """HF model dir or hub id (a merged model, or the base for --lora_model)"""
    lora_model: str | None = None
    """PEFT adapter dir to apply on top of --model"""
    tokenizer: str | None = None
    """tokenizer dir (default: the adapter dir, else the model dir)"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto | fp32 | bf16 | fp16"""
    batch_size: int = 8
    """sequences per forward pass"""
    max_length: int | None = None
    """max tokens per sequence (default: the model's max_position_embeddings)"""
    add_bos: bool = True
    """prepend the BOS token to every sequence (LLaMA convention)"""
    output: str | None = None
    """result JSON path (default: outputs/benchmarks/<bench>_<model>.json)"""
    seed: int = 0
    """random seed (sampling, subsets)"""


# ---------------------------------------------------------------------------------------------- model


def load(cfg: ModelArgs):
    """Loads the model of ``cfg`` via inference.loading (base + adapter or merged dir)."""
    if not cfg.model:
        raise ArgumentError("--model is required (an HF model dir, or the base model for --lora_model)")
    loaded = load_model(cfg.model, cfg.lora_model, tokenizer_path=cfg.tokenizer, device=cfg.device, dtype=cfg.dtype)
    return loaded


def model_max_length(model, override: int | None = None) -> int:
    if override:
        return int(override)
    conf = getattr(model, "config", None)
    return int(getattr(conf, "max_position_embeddings", 2048) or 2048)


@dataclass
class Score:
    """Log-likelihood of one continuation: sum of token log-probs, token count."""

    logprob: float
    n_tokens: int
    token_logprobs: list[float] | None = None  # per continuation token, when asked for


def _split_space(context: str, continuation: str) -> tuple[str, str]:
    n_space = len(context) - len(context.rstrip())
    if n_space:
        return context[:-n_space], context[-n_space:] + continuation
    return context, continuation


def encode_pairs(tok, pairs: list[tuple[str, str]], add_bos: bool = True,
                 chunk: int = 1024) -> list[tuple[list[int], list[int]]]:
    """lm-eval-harness tokenisation: trailing context whitespace moves to the continuation, the two are
    encoded jointly and split at the length of the separately encoded context. Contexts shared by
    several pairs are encoded once; strings are encoded in batches (fast tokenizers run in parallel)."""
    pairs = [_split_space(c, x) for c, x in pairs]

    def enc(texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for b in range(0, len(texts), chunk):
            out += tok(texts[b:b + chunk], add_special_tokens=False)["input_ids"]
        return out

    uniq_ctx = sorted({c for c, _ in pairs if c})
    ctx_len = dict(zip(uniq_ctx, (len(e) for e in enc(uniq_ctx))))
    wholes = enc([c + x for c, x in pairs])
    out = []
    for (c, _), whole in zip(pairs, wholes):
        n_ctx = min(ctx_len.get(c, 0), len(whole) - 1)  # a continuation always has at least one token
        ctx, cont = whole[:n_ctx], whole[n_ctx:]
        if add_bos and tok.bos_token_id is not None:
            ctx = [tok.bos_token_id] + ctx
        if not ctx:  # nothing to condition on: EOS as the start symbol (lm-eval does the same)
            ctx = [tok.eos_token_id]
        out.append((ctx, cont))
    return out


def encode_pair(tok, context: str, continuation: str, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """One (context, continuation) pair, tokenised as :func:`encode_pairs` does."""
    return encode_pairs(tok, [(context, continuation)], add_bos)[0]


def _forward_logits(model, input_ids, attention_mask, keep: torch.Tensor):
    """Logits at sequence positions ``keep`` only (saves the [B, T, V] tensor on big vocabularies)."""
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
        return out.logits, keep
    except TypeError:  # a model without logits_to_keep: full logits, indexed afterwards
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits[:, keep], keep


@torch.no_grad()
def score_continuations(model, requests: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8,
                        max_length: int = 2048, device=None, desc: str = "scoring", progress: bool = True,
                        per_token: bool = False) -> list[Score]:
    """Sum of log P(continuation | context) for token-id pairs, batched and right-padded.

    The model input of a request is ``(context + continuation)[:-1]`` (left-truncated to ``max_length``),
    so requests with the same input (one-token continuations of one context) share a forward pass.
    """
    device = device or next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    conts: list[list[int]] = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
        inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        groups.setdefault(tuple(inp), []).append(i)
        conts.append(list(cont))
    uniq = sorted(groups, key=len, reverse=True)  # longest first: memory errors show up at once
    results: list[Score | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, unit="req")
    for b in range(0, len(uniq), batch_size):
        batch = uniq[b:b + batch_size]
        T = max(len(x) for x in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, inp in enumerate(batch):
            ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[r, :len(inp)] = 1
        # positions whose logits are needed: the last len(cont) positions of each row
        need: set[int] = set()
        for r, inp in enumerate(batch):
            for i in groups[inp]:
                need.update(range(len(inp) - len(conts[i]), len(inp)))
        keep = torch.tensor(sorted(need), dtype=torch.long)
        col = {p: j for j, p in enumerate(keep.tolist())}
        logits, _ = _forward_logits(model, ids.to(device), mask.to(device), keep.to(device))
        for r, inp in enumerate(batch):
            for i in groups[inp]:
                c = conts[i]
                cols = [col[p] for p in range(len(inp) - len(c), len(inp))]
                lp = torch.log_softmax(logits[r, cols].float(), dim=-1)
                target = torch.tensor(c, device=lp.device)
                tok_lp = lp.gather(1, target[:, None]).squeeze(1)
                results[i] = Score(float(tok_lp.sum()), len(c), tok_lp.tolist() if per_token else None)
            bar.update(len(groups[inp]))
    bar.close()
    return results  # type: ignore[return-value]


def loglikelihood(loaded, pairs: list[tuple[str, str]], batch_size: int = 8, max_length: int | None = None,
                  add_bos: bool = True, desc: str = "scoring", progress: bool = True) -> list[Score]:
    """String-level :func:`score_continuations`: ``pairs`` of (context, continuation)."""
    tok = loaded.tokenizer
    reqs = encode_pairs(tok, pairs, add_bos)
    return score_continuations(loaded.model, reqs, tok.pad_token_id, batch_size,
                               model_max_length(loaded.model, max_length), loaded.device, desc, progress)


# ------------------------------------------------------------------------------------------ generation


@torch.no_grad()
def generate(loaded, prompts: list[str] | list[list[int]], max_new_tokens: int = 256, batch_size: int = 8, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             add_bos: bool = True, seed: int = 0, desc: str = "generating", progress: bool = True,
             constrain_fields: list[dict] | None = None, stats: dict | None = None) -> list[str]:
    """Completions (new text only) of ``prompts``: left-padded batches through ``model.generate``.

    A string prompt is raw text (``add_bos`` puts BOS before it); a list of ids is used as it is (chat prompts:
    ``ChatFormat.prompt_ids``, which hold whatever BOS the chat template has).

    Greedy when ``do_sample`` is False; otherwise sampling with the given temperature/top-p/top-k from
    a seeded generator, so a run is reproducible on the same hardware. ``constrain_fields`` (one dict per
    prompt): decode under the ABC constraint (inference/abc_constraint.py) with those header fields.
    ``stats``: gets ``new_tokens`` and ``seconds`` added, and the constraint's per-prompt ``reports``.
    """
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(seed)
    limit = model_max_length(model) - max_new_tokens
    outs: list[str] = []
    for b in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, unit="batch"):
        bos = [tok.bos_token_id] if add_bos and tok.bos_token_id is not None else []
        enc = [bos + tok.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
               for p in prompts[b:b + batch_size]]
        enc = [e[-limit:] if limit > 0 else e for e in enc]
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), T), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, T - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[r, T - len(e):] = 1
        kw = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": tok.pad_token_id,
                  "eos_token_id": tok.eos_token_id, "repetition_penalty": repetition_penalty}
        if do_sample:
            kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        proc = None
        if constrain_fields is not None:
            from transformers import LogitsProcessorList

            texts = [p if isinstance(p, str) else tok.decode(p) for p in prompts[b:b + batch_size]]  # chat: ids
            proc = constraint_processor(tok, texts, constrain_fields[b:b + batch_size],
                                        greedy=not do_sample, temperature=temperature if do_sample else 1.0,
                                        top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0,
                                        max_new_tokens=max_new_tokens)
            kw["logits_processor"] = LogitsProcessorList([proc])
        t0 = time.perf_counter()
        gen = model.generate(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), **kw)
        dt = time.perf_counter() - t0
        for r, row in enumerate(gen[:, T:].tolist()):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id) + 1]
            row = [t for t in row if t != tok.pad_token_id or t == tok.eos_token_id]
            text = tok.decode(row, skip_special_tokens=True)
            outs.append(text)
            if stats is not None:
                stats["new_tokens"] = stats.get("new_tokens", 0) + len(row)
                if proc is not None:
                    stats.setdefault("reports", []).append(
                        proc.report(r, text, ended_at_eos=bool(row) and row[-1] == tok.eos_token_id))
        if stats is not None:
            stats["seconds"] = stats.get("seconds", 0.0) + dt
    return outs


# --------------------------------------------------------------------------------------------- results


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; std 0 for a single value."""
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def model_tag(model: str) -> str:
    """A file-name part naming a model: the last two path components, so ``outputs/default/pt/final`` and
    ``.../sft/final`` stay apart (``pt_final``, ``sft_final``); a preset stays ``llama-tiny``, a hub id
    becomes ``org_name``."""
    p = Path(os.path.abspath(model)) if Path(model).exists() else Path(model)  # `final` run from inside a run dir
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.") for s in p.parts[-2:]]
    return "_".join(s for s in parts if s) or "model"


def default_output(bench: str, model: str | None, lora: str | None = None, extra: str = "") -> Path:
    return Path("outputs") / "benchmarks" / f"{bench}_{model_tag(lora or model or 'data')}{extra}.json"


def environment() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(path: str | Path, data: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    return p

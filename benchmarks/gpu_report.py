"""The GPU suite's figures against the issue's targets, read from the JSONs ``benchmarks/gpu_suite.sh`` writes.

    python -m benchmarks.gpu_report outputs/gpu                     # markdown to stdout (the suite runs it last)
    python -m benchmarks.gpu_report outputs/gpu --output r.json     # the same as JSON too

Targets (issue 7; one H100/H200, bf16):

* ``lora7b`` (tt_7b_lora.json): tunesmith >= 1.5x transformers.Trainer's tokens/s, and >= 40 % MFU;
* ``full1b`` (tt_1b_full.json): >= 45 % MFU;
* ``fit24`` / ``fit24off`` (tt_7b_lora_24gb*.json): the 7B LoRA + embeddings job runs with the allocator capped at
  23 GiB -- met when any of the three configurations fits;
* ``decode`` (gen_7b_b1.json): batch-1 decoding >= 60 % of the memory-bandwidth bound (the better of tunesmith's
  two decode paths).

Then the A/B pairs of the engine's GPU-path choices (chunked vs HF loss, compile, checkpointing granularity,
optimizer offload, varlen vs the 4D mask) as tokens/s and peak memory with the ratio. A missing JSON is "not run";
a run that ran out of memory (``"fits": false``) is "did not fit" with where. Figures of a ``REHEARSE=1`` run are
CPU figures: the report says so and the targets do not apply to them.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import markdown_table, parse_config, write_json
from data_preprocess.hub import ArgumentError, exit_on_argument_error

CAP_GIB = 23.0  # fit24's --memory_gb: a 24 GB card less its CUDA context


@dataclass
class ReportConfig:
    results_dir: str = "outputs/gpu"
    """the suite's $OUT (positional)"""
    output: str | None = None
    """also write the report as JSON here"""


def _load(d: Path, name: str) -> dict | None:
    p = d / name
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArgumentError(f"error: {p}: not JSON ({e.msg}, line {e.lineno}); was the run cut off? rerun its part") from None


def _runner(j: dict | None, runner: str = "tunesmith") -> dict | None:
    return ((j or {}).get("results") or {}).get(runner)


def _oom(r: dict | None) -> str | None:
    """"ran out of memory in step 1: CUDA out of memory, tried to allocate 2.00 GiB" for a runner that did not fit."""
    if r and r.get("fits") is False:
        o = r.get("out_of_memory") or {}
        return f"ran out of memory {o.get('at', '?')}: {o.get('error', '?')}"
    return None


def _target(name: str, part: str, value: float | None, threshold: float, unit: str, detail: str = "",
            status: str | None = None) -> dict:
    if status is None:
        status = "not run" if value is None else ("met" if value >= threshold else "NOT met")
    shown = None if value is None else (f"{100 * value:.1f} %" if unit == "%" else f"{value:.2f}{unit}")
    need = f"{100 * threshold:.0f} %" if unit == "%" else f"{threshold:g}{unit}"
    return {"target": name, "part": part, "value": value, "shown": shown, "threshold": threshold,
            "need": f">= {need}", "status": status, "detail": detail}


def targets(d: Path) -> list[dict]:
    rows = []
    lora = _load(d, "tt_7b_lora.json")
    ours, hf = _runner(lora), _runner(lora, "hf_trainer")
    if _oom(ours):
        rows += [_target("7B LoRA tokens/s vs HF Trainer", "lora7b", None, 1.5, "x", _oom(ours), "did not fit"),
                 _target("7B LoRA MFU", "lora7b", None, 0.40, "%", _oom(ours), "did not fit")]
    else:
        ratio = (lora or {}).get("tunesmith_vs_hf_trainer")
        detail = (f"{ours['tokens_per_s']:,.0f} vs {hf['tokens_per_s']:,.0f} tokens/s"
                  if ratio is not None and ours and hf and not _oom(hf) else "")
        status = None
        if ours and _oom(hf):  # the baseline cannot run the job at all: no ratio to hold against the target
            detail, status = f"HF Trainer {_oom(hf)}; tunesmith {ours['tokens_per_s']:,.0f} tokens/s", "n/a"
        rows.append(_target("7B LoRA tokens/s vs HF Trainer", "lora7b", ratio, 1.5, "x", detail, status))
        rows.append(_target("7B LoRA MFU", "lora7b", ours and ours.get("mfu"), 0.40, "%",
                            f"{ours['tokens_per_s']:,.0f} tokens/s" if ours else ""))
    full = _runner(_load(d, "tt_1b_full.json"))
    rows.append(_target("1B full fine-tune MFU", "full1b", None if _oom(full) else full and full.get("mfu"), 0.45,
                        "%", _oom(full) or (f"{full['tokens_per_s']:,.0f} tokens/s" if full else ""),
                        "did not fit" if _oom(full) else None))
    fits, tried = [], []
    for name, what in (("tt_7b_lora_24gb.json", "checkpointing every layer"),
                       ("tt_7b_lora_24gb_ck2.json", "checkpointing every 2nd layer"),
                       ("tt_7b_lora_24gb_offload.json", "optimizer offloaded (zero2_offload)")):
        r = _runner(_load(d, name))
        if r is None:
            continue
        oom, peak = _oom(r), r["peak_memory_gb"]
        if oom:
            tried.append(f"{what}: {oom}")
        elif peak > CAP_GIB:  # ran, but not under the suite's cap
            tried.append(f"{what}: ran, but peaked at {peak:.2f} GiB > {CAP_GIB:g} GiB (without --memory_gb?)")
        else:
            tried.append(f"{what}: fits, peak {peak:.2f} GiB, {r['tokens_per_s']:,.0f} tokens/s")
            fits.append(what)
    rows.append({"target": "7B LoRA + embeddings fits 24 GB (allocator capped at 23 GiB)", "part": "fit24, fit24off",
                 "value": bool(fits) if tried else None, "shown": ("yes: " + fits[0]) if fits else ("no" if tried else None),
                 "threshold": None, "need": "runs", "status": ("met" if fits else "NOT met") if tried else "not run",
                 "detail": "; ".join(tried)})
    dec = _load(d, "gen_7b_b1.json")
    best, path = None, None
    for p in ("tunesmith", "static"):
        r = ((dec or {}).get("results") or {}).get(p)
        if r and (best is None or r["pct_of_bandwidth_bound"] > best):
            best, path = r["pct_of_bandwidth_bound"], p
    rows.append(_target("7B batch-1 decode, share of the bandwidth bound", "decode",
                        None if best is None else best / 100, 0.60, "%",
                        f"{path}: {dec['results'][path]['decode_tokens_per_s']:,.1f} of "
                        f"{dec['bandwidth_bound_tokens_per_s']:,.1f} tokens/s" if path else ""))
    return rows


AB = (  # (what, part, file A, file B): B's tokens/s and peak memory against A's
    ("HF logits loss (B) vs the chunked loss (A), 7B LoRA", "loss7b", "tt_7b_lora.json", "tt_7b_lora_hfloss.json"),
    ("torch.compile'd layers (B) vs eager (A), 7B LoRA", "compile7b", "tt_7b_lora.json", "tt_7b_lora_compile.json"),
    ("checkpointing every 2nd layer (B) vs every layer (A), 7B LoRA, micro batch 1", "fit24",
     "tt_7b_lora_24gb.json", "tt_7b_lora_24gb_ck2.json"),
    ("optimizer offloaded (B) vs on the GPU (A), 7B LoRA, micro batch 1", "fit24off",
     "tt_7b_lora_24gb.json", "tt_7b_lora_24gb_offload.json"),
    ("varlen document bounds (B) vs the 4D mask (A), 1B full, block attention", "varlen",
     "tt_1b_full_block_sdpa.json", "tt_1b_full_block_varlen.json"),
)


def ab_pairs(d: Path) -> list[dict]:
    rows = []
    for what, part, fa, fb in AB:
        a, b = _runner(_load(d, fa)), _runner(_load(d, fb))
        if a is None and b is None:
            continue
        row = {"what": what, "part": part, "a": fa, "b": fb}
        for k, r in (("a", a), ("b", b)):
            row[f"{k}_tokens_per_s"] = None if r is None or _oom(r) else r["tokens_per_s"]
            row[f"{k}_peak_gb"] = None if r is None else r.get("peak_memory_gb")
            row[f"{k}_note"] = "not run" if r is None else (_oom(r) or "")
        ta, tb = row["a_tokens_per_s"], row["b_tokens_per_s"]
        row["b_over_a"] = tb / ta if ta and tb else None
        rows.append(row)
    for name, what in (("tt_small_lora.json", "smoke: llama-small LoRA vs HF Trainer"),
                       ("gen_7b_b16.json", "7B batch-16 decode")):
        j = _load(d, name)
        if j is None:
            continue
        if name.startswith("tt_"):
            rows.append({"what": what, "part": "smoke", "b_over_a": j.get("tunesmith_vs_hf_trainer"),
                         "a_tokens_per_s": (_runner(j, "hf_trainer") or {}).get("tokens_per_s"),
                         "b_tokens_per_s": (_runner(j) or {}).get("tokens_per_s"), "a": name, "b": name})
        else:
            r = j["results"]
            best = max((p for p in r if p != "hf_default"), key=lambda p: r[p]["decode_tokens_per_s"], default=None)
            if best and "hf_default" in r:
                rows.append({"what": f"{what}: {best} (B) vs model.generate defaults (A)", "part": "decode",
                             "a_tokens_per_s": r["hf_default"]["decode_tokens_per_s"],
                             "b_tokens_per_s": r[best]["decode_tokens_per_s"],
                             "b_over_a": r[best]["decode_tokens_per_s"] / r["hf_default"]["decode_tokens_per_s"],
                             "a": name, "b": name})
    return rows


def _device(d: Path) -> tuple[str, dict]:
    for p in sorted(d.glob("*.json")):
        try:
            j = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(j, dict) and isinstance(j.get("device"), dict) and "environment" in j:  # a benchmark's JSON
            return str(j["device"].get("device", "?")), j["environment"]
    return "?", {}


def report(d: Path) -> dict:
    if not d.is_dir():
        raise ArgumentError(f"error: {d}: no such directory (the $OUT of benchmarks/gpu_suite.sh)")
    device, env = _device(d)
    return {"results_dir": str(d), "device": device, "rehearsal": device.startswith("cpu"),
            "environment": {k: env.get(k) for k in ("python", "torch", "transformers", "cuda", "time")},
            "targets": targets(d), "ab": ab_pairs(d)}


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def render(rep: dict) -> str:
    env = rep["environment"]
    lines = [f"## GPU suite report: {rep['results_dir']}",
             (f"device {rep['device']}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
              f"Python {env.get('python')}; {env.get('time')}")]
    if rep["rehearsal"]:
        lines.append("REHEARSAL: these are CPU-size runs (REHEARSE=1); the GPU targets below do not apply to them.")
    lines += ["", markdown_table(["target", "part", "measured", "needs", "status", "detail"],
                                 [[t["target"], t["part"], t["shown"] or "-", t["need"], t["status"], t["detail"]]
                                  for t in rep["targets"]])]
    if rep["ab"]:
        lines += ["", markdown_table(["A/B", "part", "A tokens/s", "B tokens/s", "B / A", "A peak GiB", "B peak GiB"],
                                     [[r["what"], r["part"], _fmt(r.get("a_tokens_per_s")),
                                       _fmt(r.get("b_tokens_per_s")) if not r.get("b_note") else r["b_note"],
                                       _fmt(r.get("b_over_a"), ".2f") + ("x" if r.get("b_over_a") else ""),
                                       _fmt(r.get("a_peak_gb"), ".2f"), _fmt(r.get("b_peak_gb"), ".2f")]
                                      for r in rep["ab"]])]
    return "\n".join(lines)


@exit_on_argument_error
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:  # the directory may be given positionally
        argv = ["--results_dir", argv[0], *argv[1:]]
    cfg = parse_config(ReportConfig, argv, description=__doc__)
    rep = report(Path(cfg.results_dir))
    print(render(rep))
    if cfg.output:
        write_json(cfg.output, rep)
    return rep


if __name__ == "__main__":
    main()

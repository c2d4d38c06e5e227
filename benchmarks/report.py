"""ChatMusician's before/after table in one command: several models side by side on MMLU (letter and cloze),
MusicTheoryBench, bits per character of held-out ABC (next to gzip -9) and the quality of generated ABC.

    python -m benchmarks.report --models base=SMOLLM2_DIR pt=outputs/default/pt/final \\
        merged=outputs/default/merged lora=BASE_DIR+ADAPTER_DIR \\
        [--mmlu_limit 20] [--mmlu_subjects astronomy,virology] [--mtb_data mtb/] [--bpc_data heldout.abc] \\
        [--abc_n 50] [--abc_train_corpus corpus/] [--output DIR] [--no-mmlu] [--no-abc] ...

``NAME=PATH``: an HF model dir (a merged model, train.py's ``…/final`` of a full run, a base model);
``NAME=BASE+ADAPTER``: a base model plus a PEFT LoRA adapter (``…/final`` of a LoRA run). Each model is loaded
once and every section runs with it, through the evaluators' own ``run(cfg, loaded)``: ``benchmarks.mmlu``,
``benchmarks.music_theory_bench``, ``benchmarks.bits_per_char`` and ``benchmarks.abc_quality``. The ABC and
bits-per-char figures of the table are computed by the ``evaluate`` modules in ``benchmarks/metrics/`` (loaded
offline by path), the same modules a ``Trainer(compute_metrics=...)`` can use.

Writes into one results dir (``--output``, default ``outputs/benchmarks/report-YYYYmmdd-HHMMSS``):
``report.md`` (the table, sizes, timings, environment), ``report.json`` (every figure per model and metric,
the command, date and versions), ``report.png`` (a bar chart) and ``NAME/`` with each evaluator's own
JSON/JSONL. A section without its data is listed as not run (MusicTheoryBench without ``--mtb_data``, bits per
char without ``--bpc_data``, MMLU when the default ``../shared/data/mmlu`` is absent) and ``--no-SECTION``
turns one off. Before MMLU runs, the expected time is printed (tokens to score / this machine's measured
tokens per second), and every section shows a progress bar.
"""
from __future__ import annotations

import functools
import gc
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import abc_quality, bits_per_char, mmlu, music_theory_bench
from benchmarks.common import (
    ModelArgs,
    encode_pairs,
    environment,
    load,
    markdown_table,
    model_max_length,
    parse_config,
    score_continuations,
    write_json,
)
from data_preprocess.hub import ArgumentError, exit_on_argument_error
from training.hf_io import ModelPathError, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MMLU = REPO.parent / "shared" / "data" / "mmlu"
METRICS_DIR = Path(__file__).resolve().parent / "metrics"
SECTIONS = ("mmlu", "mtb", "bpc", "abc")

# (key in a model's "metrics", label in the table, section, kind): kind "rate" is shown in %, "bits" as is
COLUMNS = [
    ("mmlu_letter", "MMLU {shots}-shot, letter (acc)", "mmlu", "rate"),
    ("mmlu_cloze", "MMLU {shots}-shot, cloze (acc)", "mmlu", "rate"),
    ("mmlu_cloze_norm", "MMLU {shots}-shot, cloze (acc_norm)", "mmlu", "rate"),
    ("mtb_knowledge", "MusicTheoryBench knowledge", "mtb", "rate"),
    ("mtb_reasoning", "MusicTheoryBench reasoning", "mtb", "rate"),
    ("mtb_overall", "MusicTheoryBench overall", "mtb", "rate"),
    ("bits_per_char", "held-out ABC bits/char (lower is better)", "bpc", "bits"),
    ("gzip_bits_per_char", "gzip -9 bits/char, same text (reference)", "bpc", "bits"),
    ("bits_per_token", "held-out ABC bits/token", "bpc", "bits"),
    ("abc_parse_rate", "ABC: abc2midi error-free", "abc", "rate"),
    ("abc_bar_consistency", "ABC: bar-duration consistency (bars)", "abc", "rate"),
    ("abc_key_compliance", "ABC: key compliance", "abc", "rate"),
    ("abc_meter_compliance", "ABC: meter compliance", "abc", "rate"),
    ("abc_exact_copy_rate", "ABC: verbatim copies of training tunes", "abc", "rate"),
    ("abc_near_copy_rate", "ABC: near copies (n-gram overlap)", "abc", "rate"),
    ("abc_music21_parse_rate", "ABC: music21 parse rate", "abc", "rate"),
]


@dataclass
class ReportConfig:
    models: str = None
    """NAME=PATH or NAME=BASE+ADAPTER, several separated by spaces"""
    output: str | None = None
    """results dir (default: outputs/benchmarks/report-YYYYmmdd-HHMMSS)"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto | fp32 | bf16 | fp16"""
    batch_size: int = 8
    """sequences per forward pass (scoring and generation)"""
    max_length: int | None = None
    """max tokens per sequence (default: the model's max_position_embeddings)"""
    add_bos: bool = True
    """prepend BOS to every sequence"""
    seed: int = 0
    """seed of sampling and subsets"""
    estimate_only: bool = False
    """load each model, print the expected MMLU time, evaluate nothing"""
    # MMLU
    mmlu: bool = True
    """run MMLU"""
    mmlu_dir: str | None = None
    """MMLU dir with dev/ and test/ CSVs (default: ../shared/data/mmlu next to the repo, if present)"""
    mmlu_shots: int = 5
    """dev exemplars per prompt"""
    mmlu_limit: int | None = None
    """at most this many test questions per subject (e.g. 20 on a CPU)"""
    mmlu_subjects: str | None = None
    """comma-separated subjects (default: all 57)"""
    mmlu_formulation: str = "both"
    """letter | cloze | both"""
    # MusicTheoryBench
    mtb: bool = True
    """run MusicTheoryBench (needs --mtb_data)"""
    mtb_data: str | None = None
    """MusicTheoryBench file or dir (parquet/json/jsonl); without it: not run"""
    mtb_shots: int = 0
    """dev exemplars (0 = ChatMusician's zero-shot table)"""
    mtb_permutations: int = 1
    """option rotations averaged (1 = the paper's protocol)"""
    mtb_limit: int | None = None
    """at most this many questions"""
    # bits per char
    bpc: bool = True
    """run bits per character (needs --bpc_data)"""
    bpc_data: str | None = None
    """held-out ABC file/dir, or a shards dir (its val split); without it: not run"""
    bpc_docs: int | None = None
    """at most this many tunes / blocks"""
    bpc_stride: int | None = None
    """sliding-window step in tokens (default: max_length // 2)"""
    # ABC generation quality
    abc: bool = True
    """generate tunes and score them"""
    abc_n: int = 20
    """tunes generated per model"""
    abc_conditioned_share: float = 0.5
    """share of the tunes generated from key/meter instruction prompts"""
    abc_prompts: str | None = None
    """JSONL {prompt, key, meter} or text file of prompts (default: built-in)"""
    abc_train_corpus: str | None = None
    """training tunes for the verbatim/near-copy check (file, dir, music21)"""
    abc_max_new_tokens: int = 384
    """tokens per generated tune"""
    abc_temperature: float = 0.8
    """sampling temperature (0 = greedy)"""
    abc_top_p: float = 0.9
    """nucleus sampling"""
    abc_music21: bool = False
    """also report the music21 parse rate (slow)"""

    def validate(self):
        if not self.models:
            raise ArgumentError("--models is required: NAME=PATH or NAME=BASE+ADAPTER, e.g. --models "
                             "base=smollm2 merged=outputs/default/merged")
        if self.mmlu_formulation not in ("letter", "cloze", "both"):
            raise ArgumentError(f"--mmlu_formulation must be letter, cloze or both, got {self.mmlu_formulation!r}")


# ---------------------------------------------------------------------------------------------- models


def parse_models(spec: str) -> list[tuple[str, str, str | None]]:
    """``NAME=PATH`` / ``NAME=BASE+ADAPTER`` items -> (name, model, adapter). An adapter dir given alone
    raises :class:`ModelPathError` with the fix (it needs its base)."""
    out: list[tuple[str, str, str | None]] = []
    for item in spec.split("\n"):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ModelPathError(f"--models {item!r}: expected NAME=PATH or NAME=BASE+ADAPTER")
        name, path = name.strip(), path.strip()
        if any(n == name for n, _, _ in out):
            raise ModelPathError(f"--models: the name {name!r} is used twice; give each model its own name")
        base, adapter = path, None
        if not Path(path).exists() and "+" in path:
            base, adapter = path.rsplit("+", 1)
        elif (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
            raise ModelPathError(f"--models {item!r}: {path} is a LoRA adapter dir; give its base model too: "
                                 f"{name}=BASE+{path}")
        out.append((name, base, adapter))
    if not out:
        raise ModelPathError("--models: no NAME=PATH given")
    return out


def join_models_argv(argv: list[str]) -> list[str]:
    """``--models a=X b=Y --next`` -> ``--models 'a=X\\nb=Y' --next`` (parse_config takes one value per option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--models":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            out += ["--models", "\n".join(argv[i + 1:j])]
            i = j
        else:
            out.append(argv[i])
            i += 1
    return out


# ------------------------------------------------------------------------------------------- sections


def _model_args(cfg: ReportConfig, model: str, adapter: str | None) -> dict:
    return {"model": model, "lora_model": adapter, "device": cfg.device, "dtype": cfg.dtype,
            "batch_size": cfg.batch_size, "max_length": cfg.max_length, "add_bos": cfg.add_bos, "seed": cfg.seed}


def mmlu_config(cfg: ReportConfig, model: str, adapter: str | None, out: Path) -> mmlu.MMLUConfig:
    c = mmlu.MMLUConfig(**_model_args(cfg, model, adapter), data_dir=str(cfg.mmlu_dir), shots=cfg.mmlu_shots,
                        subjects=cfg.mmlu_subjects, limit=cfg.mmlu_limit, formulation=cfg.mmlu_formulation,
                        output=str(out / "mmlu.json"))
    c.validate()
    return c


def estimate_mmlu(cfg: mmlu.MMLUConfig, loaded) -> dict:
    """Requests, forward sequences and tokens MMLU will score, and the seconds that takes at this machine's
    current speed: one batch of real inputs at the token-weighted median length is timed (scoring runs the inputs
    sorted by length, so its batches carry little padding; attention makes long inputs dearer per token)."""
    questions, shots_of = mmlu.load_questions(cfg)
    tok = loaded.tokenizer
    max_len = model_max_length(loaded.model, cfg.max_length)
    by_input: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
    n_req = 0
    for form in cfg.formulations:
        reqs = encode_pairs(tok, mmlu.request_pairs(questions, shots_of, form), cfg.add_bos)
        n_req += len(reqs)
        for c, x in reqs:
            by_input.setdefault(tuple((list(c) + list(x))[-(max_len + 1):][:-1]), (c, x))
    tokens = sum(len(x) for x in by_input)
    ordered = sorted(by_input, key=len)
    cum, mid = 0, 0
    for mid, x in enumerate(ordered):  # the token-weighted median: half of all tokens are in longer inputs
        cum += len(x)
        if cum >= tokens / 2:
            break
    mid = max(0, min(mid - cfg.batch_size // 2, len(ordered) - cfg.batch_size))
    probe = [by_input[x] for x in ordered[mid:mid + cfg.batch_size]]
    t0 = time.time()
    score_continuations(loaded.model, probe, tok.pad_token_id, cfg.batch_size, max_len, loaded.device,
                        progress=False)
    dt = time.time() - t0
    probe_tokens = len(probe) * max(len(c) + len(x) - 1 for c, x in probe)  # padded, as it ran
    tps = probe_tokens / dt if dt > 0 else float("inf")
    return {"questions": len(questions), "subjects": len(shots_of), "requests": n_req, "sequences": len(by_input),
            "tokens": tokens, "tokens_per_second": tps, "expected_seconds": tokens / tps}


def _fmt_duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def run_mmlu(cfg: ReportConfig, model: str, adapter: str | None, loaded, out: Path) -> dict:
    mc = mmlu_config(cfg, model, adapter, out)
    res = mmlu.run(mc, loaded)
    m = {}
    if "letter" in mc.formulations:
        m["mmlu_letter"] = res["accuracy_micro"]
    if "cloze" in mc.formulations:
        m["mmlu_cloze"] = res["cloze"]["accuracy_micro"]
        m["mmlu_cloze_norm"] = res["cloze"]["acc_norm_micro"]
    return {"metrics": m, "n": res["n_questions"], "subjects": res["n_subjects"], "seconds": res["seconds"],
            "output": res["output"]}


def run_mtb(cfg: ReportConfig, model: str, adapter: str | None, loaded, out: Path) -> dict:
    c = music_theory_bench.MTBConfig(**_model_args(cfg, model, adapter), data=cfg.mtb_data, mode="ppl",
                                     shots=cfg.mtb_shots, permutations=cfg.mtb_permutations, limit=cfg.mtb_limit,
                                     output=str(out / "music_theory_bench.json"))
    c.validate()
    res = music_theory_bench.run(c, loaded)
    sc = res["scores"][res["primary"]]
    m = {f"mtb_{k}": sc[k]["mean"] for k in ("knowledge", "reasoning", "overall") if k in sc}
    return {"metrics": m, "n": res["n_questions"], "seconds": res["seconds"], "output": res["output"]}


@functools.cache
def load_metric(name: str):
    """One of the repository's ``evaluate`` modules, by path (no hub access); loaded once per process."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def run_bpc(cfg: ReportConfig, model: str, adapter: str | None, loaded, out: Path) -> dict:
    c = bits_per_char.BPCConfig(**_model_args(cfg, model, adapter), data=cfg.bpc_data, limit=cfg.bpc_docs,
                                stride=cfg.bpc_stride, output=str(out / "bits_per_char.json"))
    c.validate()
    res = bits_per_char.run(c, loaded)
    docs = _read_jsonl(res["per_document"])
    fig = load_metric("bits_per_char").compute(predictions=[d["nll"] for d in docs],
                                               references=[d["text"] for d in docs],
                                               n_tokens=[d["n_tokens"] for d in docs],
                                               n_chars=[d["n_chars"] for d in docs])
    m = {k: fig[k] for k in ("bits_per_char", "gzip_bits_per_char", "bits_per_token")}
    return {"metrics": m, "n": res["n_documents"], "n_chars": fig["n_chars"], "n_tokens": fig["n_tokens"],
            "seconds": res["seconds"], "output": res["output"], "evaluate": fig}


def run_abc(cfg: ReportConfig, model: str, adapter: str | None, loaded, out: Path,
            train_tunes: list[str] | None) -> dict:
    c = abc_quality.ABCQualityConfig(**_model_args(cfg, model, adapter), n=cfg.abc_n,
                                     conditioned_share=cfg.abc_conditioned_share, prompts=cfg.abc_prompts,
                                     max_new_tokens=cfg.abc_max_new_tokens, temperature=cfg.abc_temperature,
                                     top_p=cfg.abc_top_p, music21=False, output=str(out / "abc_quality.json"))
    c.validate()
    res = abc_quality.run(c, loaded)  # generation (and its own per-tune file)
    tunes = _read_jsonl(res["per_tune"])
    fig = load_metric("abc_quality").compute(predictions=[t.get("abc") for t in tunes],
                                             keys=[t.get("key") for t in tunes],
                                             meters=[t.get("meter") for t in tunes],
                                             train_tunes=train_tunes, music21=cfg.abc_music21)
    m = {f"abc_{k}": fig.get(k) for k in ("parse_rate", "bar_consistency", "key_compliance", "meter_compliance",
                                           "exact_copy_rate", "near_copy_rate", "music21_parse_rate")}
    return {"metrics": {k: v for k, v in m.items() if v is not None}, "n": fig["n"], "seconds": res["seconds"],
            "output": res["output"], "evaluate": fig}


# ------------------------------------------------------------------------------------------------ run


def _skips(cfg: ReportConfig) -> dict[str, str]:
    """Sections that will not run, with the reason shown in the table."""
    skip = {s: "turned off (--no-" + s + ")" for s in SECTIONS if not getattr(cfg, s)}
    if cfg.mmlu and not cfg.mmlu_dir:
        skip["mmlu"] = f"not run (no --mmlu_dir, and {DEFAULT_MMLU} is absent)"
    if cfg.mtb and not cfg.mtb_data:
        skip["mtb"] = "not run (no --mtb_data)"
    if cfg.bpc and not cfg.bpc_data:
        skip["bpc"] = "not run (no --bpc_data)"
    if cfg.abc and cfg.abc_n == 0:
        skip["abc"] = "not run (--abc_n 0)"
    return skip


def _check_inputs(cfg: ReportConfig) -> None:
    """Fails before any model is loaded when a given data path does not exist."""
    for opt_name in ("mmlu_dir", "mtb_data", "bpc_data", "abc_prompts"):
        v = getattr(cfg, opt_name)
        if v and getattr(cfg, opt_name.split("_")[0]) and not Path(v).exists():
            raise ArgumentError(f"--{opt_name} {v}: no such file or directory")
    if cfg.abc and cfg.abc_train_corpus and cfg.abc_train_corpus != "music21" and not Path(cfg.abc_train_corpus).exists():
        raise ArgumentError(f"--abc_train_corpus {cfg.abc_train_corpus}: no such file or directory")


def versions() -> dict:
    import importlib.metadata as md

    out = environment()
    for pkg in ("numpy", "peft", "accelerate", "evaluate", "datasets", "tokenizers", "music21", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    for key, cmd in (("abc2midi", ["abc2midi", "-ver"]), ("git_commit", ["git", "-C", str(REPO), "rev-parse", "HEAD"])):
        try:
            out[key] = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                      timeout=10).stdout.strip()[:40] or None
        except (OSError, subprocess.SubprocessError):
            out[key] = None
    return out


def run(cfg: ReportConfig) -> dict:
    models = parse_models(cfg.models)
    for name, model, adapter in models:  # every path is checked before the first model spends hours
        try:
            resolve_model_path(model, "model")
            if adapter:
                resolve_model_path(adapter, "adapter")
        except ModelPathError as e:
            raise ModelPathError(f"--models {name}=...: {e}") from None
    if cfg.mmlu and not cfg.mmlu_dir and DEFAULT_MMLU.is_dir():
        cfg.mmlu_dir = str(DEFAULT_MMLU)
    _check_inputs(cfg)
    skips = _skips(cfg)
    out_dir = Path(cfg.output or Path("outputs") / "benchmarks" / time.strftime("report-%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tunes = None
    if "abc" not in skips and cfg.abc_train_corpus:
        train_tunes = abc_quality.read_abc_source(cfg.abc_train_corpus)
        print(f"[report] {len(train_tunes)} training tunes for the copy check from {cfg.abc_train_corpus}")
    t_start = time.time()
    result = {"report": "tunesmith before/after", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.report", *sys.argv[1:]]),
              "output_dir": str(out_dir), "config": vars(cfg), "skipped": skips, "models": {}}
    runners = {"mmlu": run_mmlu, "mtb": run_mtb, "bpc": run_bpc}
    for name, model, adapter in models:
        print(f"[report] {name}: loading {model}" + (f" + adapter {adapter}" if adapter else ""), flush=True)
        t0 = time.time()
        loaded = load(ModelArgs(**_model_args(cfg, model, adapter)))
        entry = {"model": model, "adapter": adapter, "load_seconds": time.time() - t0, "sections": {},
                 "metrics": {}}
        sub = out_dir / name
        if "mmlu" not in skips:
            est = estimate_mmlu(mmlu_config(cfg, model, adapter, sub), loaded)
            entry["mmlu_estimate"] = est
            print(f"[report] {name}: MMLU {cfg.mmlu_formulation} over {est['subjects']} subjects, "
                  f"{est['questions']} questions = {est['requests']} requests, {est['sequences']} forward "
                  f"sequences, {est['tokens']:,} tokens; at {est['tokens_per_second']:,.0f} tokens/s (measured "
                  f"now) expect about {_fmt_duration(est['expected_seconds'])}", flush=True)
        if cfg.estimate_only:
            result["models"][name] = entry
            del loaded
            gc.collect()
            continue
        for sec in SECTIONS:
            if sec in skips:
                continue
            print(f"[report] {name}: {sec}", flush=True)
            t1 = time.time()
            r = (run_abc(cfg, model, adapter, loaded, sub, train_tunes) if sec == "abc"
                 else runners[sec](cfg, model, adapter, loaded, sub))
            r["wall_seconds"] = time.time() - t1
            entry["sections"][sec] = r
            entry["metrics"].update(r["metrics"])
        entry["wall_seconds"] = time.time() - t0
        result["models"][name] = entry
        write_json(out_dir / "report.json", result)  # partial: the models done so far survive a later failure
        del loaded
        gc.collect()
    result["wall_seconds"] = time.time() - t_start
    result["environment"] = versions()
    result["columns"] = [{"key": k, "label": lab.format(shots=cfg.mmlu_shots), "section": s, "kind": kind}
                         for k, lab, s, kind in COLUMNS]
    write_json(out_dir / "report.json", result)
    if not cfg.estimate_only:
        (out_dir / "report.md").write_text(markdown(result), encoding="utf-8")
        plot(result, out_dir / "report.png")
    return result


# ------------------------------------------------------------------------------------------- outputs

USAGE = """The ABC and bits-per-character figures come from the `evaluate` modules in `benchmarks/metrics/`
(they call `benchmarks.abc_quality` / `benchmarks.abc_metrics` / `benchmarks.bits_per_char`), loaded by path,
offline. Your own evaluation loop or `Trainer(compute_metrics=...)` can use them the same way:

```python
import evaluate
abc = evaluate.load("benchmarks/metrics/abc_quality")          # path in the tunesmith repository
abc.compute(predictions=generated_tunes, keys=["G", "Em"], meters=["6/8", "3/4"], train_tunes=train_tunes)
# -> {'parse_rate': ..., 'bar_consistency': ..., 'key_compliance': ..., 'exact_copy_rate': ..., ...}
bpc = evaluate.load("benchmarks/metrics/bits_per_char")
bpc.compute(predictions=nll_nats_per_tune, references=tune_texts, n_tokens=tokens_per_tune)
# -> {'bits_per_char': ..., 'gzip_bits_per_char': ..., 'bits_per_token': ..., ...}
```"""


def _cell(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f} %" if kind == "rate" else f"{v:.3f}"


def markdown(result: dict) -> str:
    names = list(result["models"])
    skips = result["skipped"]
    rows = []
    for col in result["columns"]:
        sec = col["section"]
        if sec in skips:
            continue
        vals = [result["models"][n]["metrics"].get(col["key"]) for n in names]
        if all(v is None for v in vals):
            continue
        rows.append([col["label"]] + [_cell(v, col["kind"]) for v in vals])
    labels = {"mmlu": "MMLU", "mtb": "MusicTheoryBench", "bpc": "bits per char", "abc": "ABC quality"}
    rows += [[labels[s], *([why] * len(names))] for s, why in skips.items()]
    lines = [f"# tunesmith before/after report ({result['date']})", "",
             markdown_table(["metric"] + names, rows), "", "## Models", ""]
    for n in names:
        e = result["models"][n]
        what = f"`{e['model']}`" + (f" + adapter `{e['adapter']}`" if e["adapter"] else "")
        secs = ", ".join(f"{s} {v['wall_seconds']:.0f} s" for s, v in e["sections"].items())
        lines.append(f"* **{n}**: {what}; load {e['load_seconds']:.0f} s; {secs}; total {e.get('wall_seconds', 0):.0f} s")
    lines += ["", "## Sizes", ""]
    cfg = result["config"]
    first = next(iter(result["models"].values()))["sections"]
    if "mmlu" in first:
        limit = f"at most {cfg['mmlu_limit']} per subject" if cfg["mmlu_limit"] else "all of each subject"
        lines.append(f"* MMLU: {first['mmlu']['n']} test questions over {first['mmlu']['subjects']} subjects "
                     f"(`{cfg['mmlu_dir']}`, {cfg['mmlu_shots']}-shot, {limit}); "
                     "letter = log-likelihood of ' A'..' D' (lm-eval `mmlu`), cloze = of ' {option text}' "
                     "(lm-eval `mmlu_continuation`; acc_norm per UTF-8 byte). Chance: 25 %.")
    if "mtb" in first:
        lines.append(f"* MusicTheoryBench: {first['mtb']['n']} questions (`{cfg['mtb_data']}`), ppl mode, "
                     f"{cfg['mtb_shots']}-shot, {cfg['mtb_permutations']} rotation(s). Chance: 25 %.")
    if "bpc" in first:
        b = first["bpc"]
        lines.append(f"* bits per char: {b['n']} documents, {b['n_chars']:,} characters of `{cfg['bpc_data']}`; "
                     "gzip -9 of the same text is the classical reference (a model should be below it).")
    if "abc" in first:
        lines.append(f"* ABC quality: {first['abc']['n']} generated tunes per model, "
                     f"{100 * cfg['abc_conditioned_share']:.0f} % from key/meter prompts (compliance is over "
                     f"those), temperature {cfg['abc_temperature']}, top-p {cfg['abc_top_p']}, seed {cfg['seed']}; "
                     + (f"copies against `{cfg['abc_train_corpus']}`." if cfg["abc_train_corpus"]
                        else "no --abc_train_corpus, so no copy check."))
    env = result["environment"]
    lines += ["", "## Environment", "", f"`{result['command']}`", "",
              ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "transformers", "peft", "evaluate", "cuda",
                                                   "git_commit") if env.get(k))
              + f"; wall time {_fmt_duration(result['wall_seconds'])}.", "", "## Using the metrics elsewhere", "",
              USAGE, ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """Grouped bars: rates (%) on the left, bits per char (with gzip's) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    cols = [c for c in result["columns"] if c["section"] not in result["skipped"]
            and any(result["models"][n]["metrics"].get(c["key"]) is not None for n in names)]
    rates = [c for c in cols if c["kind"] == "rate"]
    bits = [c for c in cols if c["key"] in ("bits_per_char", "gzip_bits_per_char")]
    panels = [p for p in (rates, bits) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 0.9 * len(rates) * max(1, len(names)) / 2, 4.5),
                             dpi=110, squeeze=False, gridspec_kw={"width_ratios": [max(1, len(p)) for p in panels]})
    width = 0.8 / len(names)
    for ax, group in zip(axes[0], panels):
        scale = 100 if group is rates else 1
        for i, n in enumerate(names):
            vals = [result["models"][n]["metrics"].get(c["key"]) for c in group]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(group))]
            ax.bar(xs, [scale * (v if v is not None else 0) for v in vals], width, label=n)
        ax.set_xticks(range(len(group)))
        short = {"bits_per_char": "model", "gzip_bits_per_char": "gzip -9 (reference)"}
        ax.set_xticklabels([short.get(c["key"], c["label"].replace("ABC: ", "").replace("MusicTheoryBench", "MTB"))
                            for c in group], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("%" if group is rates else "held-out ABC, bits per character")
        if group is rates:
            ax.set_ylim(0, 100)
            if any(c["section"] in ("mmlu", "mtb") for c in group):
                ax.axhline(25, color="grey", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"tunesmith report {result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@exit_on_argument_error
def main(argv=None) -> int:
    cfg = parse_config(ReportConfig, join_models_argv(sys.argv[1:] if argv is None else list(argv)), __doc__)
    result = run(cfg)
    out = Path(result["output_dir"])
    if cfg.estimate_only:
        print(f"\nestimates: {out / 'report.json'}")
        return 0
    print((out / "report.md").read_text(encoding="utf-8").split("\n## Models")[0])
    print(f"report: {out / 'report.md'}  {out / 'report.json'}  {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

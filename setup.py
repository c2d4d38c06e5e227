"""tunesmith: train LLaMA-family models on symbolic (ABC) and audio-codec music with DeepSpeed."""
from pathlib import Path

from setuptools import setup

setup(
    name="tunesmith",
    version="0.1.0",
    description="ChatMusician-style continual pretraining and instruction tuning of LLaMA on ABC "
    "notation and neural-codec audio tokens, on DeepSpeed ZeRO.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["data_preprocess", "training", "inference", "benchmarks"],
    include_package_data=True,
    package_data={"inference": ["static/*"]},  # the demo's page (inference/demo.py serves it)
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.15",
        # <5.25: 5.25 makes the `kernels` package a hard dependency, and its forward wrappers (kernels 0.19.1) break
        # torch.compile's graph inside gradient-checkpointed layers (tests/test_train_compile.py). Lift the pin once
        # that test passes again on a newer transformers / kernels.
        "transformers>=4.45,<5.25",
        "peft>=0.12",
        "datasets>=2.19",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "music21>=9.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "regex>=2023.0",
        "tqdm>=4.66",
        "wandb>=0.16",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "psutil>=5.9",
        "gguf>=0.10",          # reading .gguf model files (training/import_gguf.py); transformers dequantises with it
        "accelerate>=0.26",    # transformers' from_pretrained(gguf_file=...) needs it
        "evaluate>=0.4",       # the ABC metrics as local evaluate modules (benchmarks/metrics)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "ruff==0.17.6", "playwright>=1.40", "mistral-common>=1.3"],
    },
)

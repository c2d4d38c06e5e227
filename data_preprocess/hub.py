"""Local path or Hugging Face Hub id? Shared by every loader that takes either (models, adapters, datasets),
so a typo'd local path fails at once in one line instead of after the Hub's retries."""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline(*names: str) -> bool:
    """Whether any of the offline variables ``names`` (default: all of :data:`OFFLINE_VARS`) is set to true."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in names or OFFLINE_VARS)


def could_be_hub_id(name: str) -> bool:
    """Whether ``name`` (not an existing path) can be a Hub repo id rather than a missing local path: at most one
    '/', no leading '.', '/' or '~', a first component that does not exist locally (``outputs/nope`` is a typo
    under a local dir), Hub characters only."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    if "/" in name and Path(name.split("/")[0]).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True

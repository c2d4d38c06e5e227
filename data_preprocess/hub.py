"""Path arguments of the CLIs: local path or Hugging Face Hub id? (shared by every loader that takes either --
models, adapters, datasets -- so a typo'd local path fails at once instead of after the Hub's retries), and the
one-line error every CLI prints for an unusable path argument."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path


class ArgumentError(ValueError):
    """An unusable path argument (model, adapter, tokenizer, codec, input); ``str(e)`` is one line with the
    argument, the reason and the fix. Subclassed by ``training.hf_io.ModelPathError`` and
    ``data_preprocess.audio_codec.AudioInputError``; :func:`exit_on_argument_error` prints it."""


def exit_on_argument_error(main):
    """Decorates a CLI ``main``: an :class:`ArgumentError` ends the program with ``error: <its line>`` on stderr
    and exit status 2 (argparse's status for a bad argument) instead of a traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ArgumentError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return wrapper

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

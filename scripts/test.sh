#!/usr/bin/env bash
# Runs the test suite. Sets everything up on a fresh machine first (scripts/env.sh).
#   bash scripts/test.sh            # whole suite
#   bash scripts/test.sh -k resume  # extra args go to pytest (the ruff lint step runs either way)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# lint first (ruff.toml; ruff is pinned in setup.py's dev extra): a finding fails the run before pytest starts.
# An explicit exit: env.sh ends with `set +euo pipefail`, so errexit is off from here on.
python -m ruff check . || { rc=$?; echo "[test] ruff check failed (rc=$rc); see above" >&2; exit "$rc"; }
python -m pytest -q -ra "$@"

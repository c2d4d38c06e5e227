#!/usr/bin/env bash
# Runs the test suite. Sets everything up on a fresh machine first (scripts/env.sh).
#   bash scripts/test.sh            # whole suite
#   bash scripts/test.sh -k resume  # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -ra "$@"

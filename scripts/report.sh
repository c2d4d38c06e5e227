#!/usr/bin/env bash
# ChatMusician's before/after table for the default job (bash scripts/train.sh): the base SmolLM2, after continual
# pretraining (base + the pt adapter) and after SFT (the merged model), side by side -- MMLU 5-shot (letter and
# cloze) on the real CSVs, bits per character of held-out ABC next to gzip -9, ABC generation quality.
#
#   bash scripts/report.sh                                   # CPU-sized defaults (see below)
#   MMLU_SUBJECTS=all MMLU_LIMIT=20 ABC_N=100 bash scripts/report.sh   # the issue's sizes (hours on 2 cores)
#
# Env: OUT (the train.sh output root, outputs/default), BASE (smollm2-135m), MMLU_DIR (../shared/data/mmlu),
#      MMLU_SUBJECTS (comma list or all; default 3 subjects), MMLU_LIMIT (questions per subject, 20), ABC_N (40),
#      HELDOUT (ABC outside the training corpus; default: the real tunes among abcmidi's examples -- Debian's
#      abcmidi package, installed by scripts/env.sh -- which are not in music21's corpus), REPORT (output dir).
# Extra arguments go to python -m benchmarks.report (e.g. --no-mmlu).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
OUT="${OUT:-outputs/default}"
BASE="${BASE:-smollm2-135m}"
MMLU_DIR="${MMLU_DIR:-../shared/data/mmlu}"
MMLU_SUBJECTS="${MMLU_SUBJECTS:-high_school_geography,astronomy,marketing}"
MMLU_LIMIT="${MMLU_LIMIT:-20}"
ABC_N="${ABC_N:-40}"
REPORT="${REPORT:-$OUT/report}"
if [ -z "${HELDOUT:-}" ]; then
  HELDOUT="$OUT/heldout_abcmidi.abc"
  ex=/usr/share/doc/abcmidi/examples
  cat "$ex"/{araber,baym_rebin,boys,coleraine,dergasn,demo}.abc > "$HELDOUT"
fi
subjects=(); [ "$MMLU_SUBJECTS" != all ] && subjects=(--mmlu_subjects "$MMLU_SUBJECTS")
models=("base=$BASE")
[ -f "$OUT/pt/final/adapter_config.json" ] && models+=("pt=$BASE+$OUT/pt/final")
[ -f "$OUT/merged/config.json" ] && models+=("sft_merged=$OUT/merged")
python -m benchmarks.report --models "${models[@]}" --mmlu_dir "$MMLU_DIR" "${subjects[@]}" \
  --mmlu_limit "$MMLU_LIMIT" --mmlu_formulation both --bpc_data "$HELDOUT" --abc_n "$ABC_N" \
  --abc_train_corpus music21 --output "$REPORT" "$@"

#!/usr/bin/env bash
# ChatMusician-style SFT of the continually pretrained LLaMA2-7B, 16 GPUs (configs/sft_llama2_7b.yaml): the
# pretraining adapter is merged into LLaMA2 first (training/merge.py), then a new LoRA (r=64 alpha=16 dropout
# 0.1, attention + MLP + trainable embeddings) is trained on "Human: ... </s> Assistant: ... </s>" data
# (answers only as targets), seq 2048, lr 1e-4, 5% warmup + cosine, clip 1.0, ZeRO-2, bf16.
#
#   MODEL=/models/Llama-2-7b-hf SFT_DATA=/data/instructions.jsonl bash scripts/sft_llama2_7b.sh
#   MODEL=... HOSTFILE=hosts bash scripts/sft_llama2_7b.sh num_epochs=3
# Env: MODEL (the LLaMA2 base the pretraining used), PT_OUT (pretraining output, outputs/llama2_7b/pt),
#      BASE (skip the merge: an already merged/pretrained HF dir), SFT_DATA (JSONL of instruction/output or
#      messages; default: instructions made from the ABC metadata of CORPUS), DATA (sft shards dir), OUT,
#      NUM_GPUS (16), HOSTFILE, DS_CONFIG (zero2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
PT_OUT="${PT_OUT:-outputs/llama2_7b/pt}"
DATA="${DATA:-outputs/llama2_7b/data/sft}"
OUT="${OUT:-outputs/llama2_7b/sft}"
NUM_GPUS="${NUM_GPUS:-16}"
BASE="${BASE:-outputs/llama2_7b/pt_merged}"
if [ ! -f "$BASE/config.json" ]; then
  MODEL="${MODEL:?set MODEL to the LLaMA2-7B the pretraining started from (or BASE to a merged model)}"
  python -m training.merge --base_model "$MODEL" --lora_model "$PT_OUT/final" --output_dir "$BASE" --dtype bf16
fi
if [ ! -f "$DATA/meta.json" ]; then
  if [ -n "${SFT_DATA:-}" ]; then src=(-i "$SFT_DATA"); else
    src=(-i "${CORPUS:?set SFT_DATA (instruction JSONL) or CORPUS (ABC corpus for metadata instructions)}" --make_sft_from_metadata); fi
  python -m data_preprocess.preprocess -t "$BASE" "${src[@]}" -o "$DATA" --mode sft --max_len 2048 -w "$(nproc)"
fi
if [ -n "${HOSTFILE:-}" ]; then LAUNCH=(deepspeed --hostfile "$HOSTFILE"); else LAUNCH=(deepspeed --num_gpus "$NUM_GPUS"); fi
"${LAUNCH[@]}" training/train.py --config configs/sft_llama2_7b.yaml "model=$BASE" "data_dir=$DATA" \
  "output_dir=$OUT" "ds_config=${DS_CONFIG:-ds_configs/zero2.json}" resume=auto "$@"

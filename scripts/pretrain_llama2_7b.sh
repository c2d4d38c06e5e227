#!/usr/bin/env bash
# ChatMusician-style continual pretraining of LLaMA2-7B on ABC notation, 16 GPUs (configs/pt_llama2_7b.yaml):
# LoRA r=64 alpha=16 dropout 0.1 on the 7 attention/MLP projections + trainable embed_tokens/lm_head,
# 2048-token packed blocks, AdamW lr 1e-4 betas (0.9, 0.95) wd 0.1, 5% warmup + cosine, clip 1.0, ZeRO-2, bf16.
#
#   MODEL=/models/Llama-2-7b-hf CORPUS=/data/abc bash scripts/pretrain_llama2_7b.sh          # one 16-GPU node
#   MODEL=... HOSTFILE=hosts bash scripts/pretrain_llama2_7b.sh                              # 2 nodes x 8 GPUs
#   ... bash scripts/pretrain_llama2_7b.sh lr=5e-5 ds_config=ds_configs/zero3.json          # key=value overrides
# Env: MODEL (HF dir or hub id, required), CORPUS (raw ABC for preprocessing; skipped when DATA has meta.json),
#      DATA (shards dir), OUT, NUM_GPUS (16), HOSTFILE, DS_CONFIG (zero2; zero2_offload / zero3(_offload) to save memory).
# Re-running continues from the last complete checkpoint (resume=auto).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
MODEL="${MODEL:?set MODEL to a LLaMA2-7B HF dir or hub id}"
DATA="${DATA:-outputs/llama2_7b/data/pt}"
OUT="${OUT:-outputs/llama2_7b/pt}"
NUM_GPUS="${NUM_GPUS:-16}"
if [ ! -f "$DATA/meta.json" ]; then
  CORPUS="${CORPUS:?no shards in $DATA: set CORPUS to the ABC corpus to preprocess (dir, .jsonl, datasets id)}"
  python -m data_preprocess.preprocess -t "$MODEL" -i "$CORPUS" -o "$DATA" --mode pt --max_len 2048 -w "$(nproc)"
fi
if [ -n "${HOSTFILE:-}" ]; then LAUNCH=(deepspeed --hostfile "$HOSTFILE"); else LAUNCH=(deepspeed --num_gpus "$NUM_GPUS"); fi
"${LAUNCH[@]}" training/train.py --config configs/pt_llama2_7b.yaml "model=$MODEL" "data_dir=$DATA" \
  "output_dir=$OUT" "ds_config=${DS_CONFIG:-ds_configs/zero2.json}" resume=auto "$@"

#!/usr/bin/env bash
# End-to-end default run of tunesmith: tokenizer + shards of the music21 ABC corpus -> pretrain a small
# LLaMA from scratch (full) -> SFT it with LoRA on metadata->tune instructions -> merge + sample a tune.
#
#   bash scripts/train.sh                      # CPU defaults (about 10 min on 2 cores)
#   OUT=outputs/x DATA=/data/abc NUM_GPUS=8 DS_CONFIG=ds_configs/zero3.json bash scripts/train.sh lr=1e-3
#
# Environment overrides (all optional):
#   OUT         output root (default outputs/default): data/, pt/, sft/, merged/
#   DATA        corpus: music21 | dir of .abc/.txt | .jsonl | datasets dir/hub id     (default music21)
#   LIMIT       tunes to preprocess (default 4000; 0 = all)    VOCAB   tokenizer size (default 2000)
#   MAX_LEN     block length in tokens (default 256)
#   PT_MODEL    model of the pretraining stage: preset or HF dir (default: configs/pt_small.yaml's llama-small)
#   PT_CONFIG / SFT_CONFIG   job configs (default configs/pt_small.yaml, configs/sft_small.yaml)
#   DS_CONFIG   DeepSpeed config for both stages (default: the job configs' ds_configs/zero2.json)
#   NUM_GPUS    GPUs per node for the deepspeed launcher (default: all visible GPUs; none -> plain python on CPU)
#   HOSTFILE    multi-node: deepspeed --hostfile HOSTFILE
#   PT_STEPS / SFT_STEPS     optimizer steps of each stage
#   SKIP_PT=1   reuse OUT/pt/final;   SKIP_SAMPLE=1 skip the merge + sample step
# Extra arguments (key=value) are passed to both training stages, e.g. lr=1e-3 report_to=tensorboard,wandb.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
export WANDB_MODE="${WANDB_MODE:-offline}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

OUT="${OUT:-outputs/default}"
DATA="${DATA:-music21}"
LIMIT="${LIMIT:-4000}"
VOCAB="${VOCAB:-2000}"
MAX_LEN="${MAX_LEN:-256}"
PT_CONFIG="${PT_CONFIG:-configs/pt_small.yaml}"
SFT_CONFIG="${SFT_CONFIG:-configs/sft_small.yaml}"
t0=$(date +%s)
say() { echo "[train.sh $(( $(date +%s) - t0 ))s] $*"; }

# ---- launcher: deepspeed on GPUs / hostfile, plain python on CPU --------------------------------------
gpus="${NUM_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"
if [ -n "${HOSTFILE:-}" ]; then
  LAUNCH=(deepspeed --hostfile "$HOSTFILE" training/train.py)
elif [ "$gpus" -gt 0 ]; then
  LAUNCH=(deepspeed --num_gpus "$gpus" training/train.py)
else
  LAUNCH=(python training/train.py)
fi
common=()
[ -n "${DS_CONFIG:-}" ] && common+=("ds_config=$DS_CONFIG")

# ---- 1. data: tokenizer + pt shards + sft shards (skipped when already there) -------------------------
lim=(); [ "$LIMIT" != 0 ] && lim=(--limit "$LIMIT")
if [ ! -f "$OUT/data/tokenizer/tokenizer.model" ]; then
  say "tokenizer ($VOCAB pieces) on $DATA"
  python -m data_preprocess.train_tokenizer -i "$DATA" -o "$OUT/data/tokenizer" --vocab_size "$VOCAB" --overwrite >/dev/null
fi
if [ ! -f "$OUT/data/pt/meta.json" ]; then
  say "pt shards (max_len $MAX_LEN)"
  python -m data_preprocess.preprocess -t "$OUT/data/tokenizer" -i "$DATA" -o "$OUT/data/pt" --mode pt \
    --max_len "$MAX_LEN" "${lim[@]}" --no_progress --overwrite | tail -n 4
fi
if [ ! -f "$OUT/data/sft/meta.json" ]; then
  say "sft shards (metadata -> tune instructions)"
  python -m data_preprocess.preprocess -t "$OUT/data/tokenizer" -i "$DATA" -o "$OUT/data/sft" --mode sft \
    --make_sft_from_metadata --max_len "$MAX_LEN" "${lim[@]}" --no_progress --overwrite | tail -n 4
fi

# ---- 2. continual pretraining (here from scratch), full fine-tuning -----------------------------------
pt=("data_dir=$OUT/data/pt" "output_dir=$OUT/pt" "resume=auto")
[ -n "${PT_MODEL:-}" ] && pt+=("model=$PT_MODEL")
[ -n "${PT_STEPS:-}" ] && pt+=("max_steps=$PT_STEPS")
if [ "${SKIP_PT:-0}" != 1 ]; then
  say "pretraining: ${LAUNCH[*]} --config $PT_CONFIG"
  "${LAUNCH[@]}" --config "$PT_CONFIG" "${pt[@]}" "${common[@]}" "$@"
fi

# ---- 3. SFT with LoRA on top of the pretrained model --------------------------------------------------
sft=("data_dir=$OUT/data/sft" "output_dir=$OUT/sft" "model=$OUT/pt/final" "resume=auto")
[ -n "${SFT_STEPS:-}" ] && sft+=("max_steps=$SFT_STEPS")
say "SFT (LoRA): ${LAUNCH[*]} --config $SFT_CONFIG"
"${LAUNCH[@]}" --config "$SFT_CONFIG" "${sft[@]}" "${common[@]}" "$@"

# ---- 4. MERGE + SAMPLE -----------------------------------------------------------------------------------
# Merge the LoRA adapter into its base (training/merge.py) and print one generated tune (inference/predict.py).
if [ "${SKIP_SAMPLE:-0}" != 1 ]; then
  say "merge LoRA -> $OUT/merged"
  python -m training.merge --base_model "$OUT/pt/final" --lora_model "$OUT/sft/final" \
    --output_dir "$OUT/merged" --overwrite
  prompt="Write a tune in D major, in 6/8 time, called \"The Morning Walk\"."
  echo "$prompt" > "$OUT/sample_prompt.txt"
  say "sample: $prompt"
  python -m inference.predict --base_model "$OUT/merged" --with_prompt --data_file "$OUT/sample_prompt.txt" \
    --predictions_file "$OUT/sample.json" --max_new_tokens 256 --seed 0 --render "$OUT/sample_render"
  python -c 'import json, sys; print("\n--- sample tune ---\n" + json.load(open(sys.argv[1]))[0]["output"])' \
    "$OUT/sample.json"
  say "sample rendered (MIDI/WAV/SVG when the reply holds ABC): $OUT/sample_render"
fi
say "done. Loss curves: $OUT/pt/loss_curve.png $OUT/sft/loss_curve.png; metrics: $OUT/*/metrics.jsonl"

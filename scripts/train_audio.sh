#!/usr/bin/env bash
# The audio-codec branch end to end: embedded ABC corpus -> rendered audio (abc2midi + fluidsynth) -> codec
# tokens -> DeepSpeed training (mode audio) -> a generated WAV. With no arguments it runs on a CPU in a few
# minutes, with a small RANDOMLY INITIALISED codec (the pipeline is real, the sound is meaningless).
#
#   bash scripts/train_audio.sh                                   # CPU demo
#   CODEC=/models/encodec_32khz CROP=10 LIMIT=0 MAX_CROPS=0 bash scripts/train_audio.sh \
#       model=llama-1b max_steps=20000 global_batch_size=64 micro_batch_size=8     # real codec, GPU
#
# Environment knobs (defaults in brackets): OUT [outputs/audio], CODEC [random-small] (a local EnCodec dir),
# INPUT [music21] (or a folder of audio + .txt captions, or a datasets dir/id), LAYOUT [delay|flatten],
# CROP [3] seconds, LIMIT [80] source tunes/files (0 = all), MAX_CROPS [2] per file (0 = all),
# VOCAB [2000] text tokenizer size, PROMPT, GEN_SECONDS [4]. Extra arguments are key=value overrides of
# configs/audio_small.yaml (see training/config.py). Rerunning reuses finished stages (delete OUT to redo).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# One BLAS thread by default: the models here are small, and on a shared or oversubscribed CPU more threads
# spin against each other (measured on the 2-core dev box under load: training 1.2k vs 0.24k tok/s,
# generation 63 vs 3 tok/s). On a dedicated many-core CPU try OMP_NUM_THREADS=$(nproc).
export WANDB_MODE="${WANDB_MODE:-offline}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

OUT="${OUT:-outputs/audio}"
CODEC="${CODEC:-random-small}"
INPUT="${INPUT:-music21}"
LAYOUT="${LAYOUT:-delay}"
CROP="${CROP:-3}"
LIMIT="${LIMIT:-80}"
MAX_CROPS="${MAX_CROPS:-2}"
VOCAB="${VOCAB:-2000}"
PROMPT="${PROMPT:-jig in D major, 6/8 time, played on violin}"
GEN_SECONDS="${GEN_SECONDS:-4}"

echo "== 1/4 text tokenizer (captions) -> $OUT/text_tokenizer"
if [ ! -f "$OUT/text_tokenizer/tokenizer_config.json" ]; then
  python -m data_preprocess.train_tokenizer -i music21 -o "$OUT/text_tokenizer" --vocab_size "$VOCAB" --overwrite
fi

echo "== 2/4 audio + captions -> codec tokens ($LAYOUT) -> $OUT/data"
if [ ! -f "$OUT/data/meta.json" ]; then
  python -m data_preprocess.audio -t "$OUT/text_tokenizer" -i "$INPUT" -o "$OUT/data" --codec "$CODEC" \
    --layout "$LAYOUT" --crop_seconds "$CROP" --limit "$LIMIT" --max_crops_per_file "$MAX_CROPS" \
    --val_ratio 0.05 --overwrite
fi

echo "== 3/4 train (mode audio) -> $OUT/run"
resume=()
[ -f "$OUT/run/checkpoints/latest" ] && resume=(--resume auto)
python training/train.py --config configs/audio_small.yaml "${resume[@]}" data_dir="$OUT/data" \
  output_dir="$OUT/run" "$@"

echo "== 4/4 generate ${GEN_SECONDS}s: \"$PROMPT\" -> $OUT/sample.wav"
python -m inference.audio --model "$OUT/run/final" --prompt "$PROMPT" --seconds "$GEN_SECONDS" \
  --out "$OUT/sample.wav"
echo "done: $OUT/sample.wav (codes: $OUT/sample.npy, record: $OUT/sample.json, loss curve: $OUT/run/loss_curve.png)"

#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in parts that each fit one 10-minute device command.
#
#   bash benchmarks/gpu_suite.sh PART [PART ...]        # results (JSON + log) under $OUT (default outputs/gpu)
#
# PARTS
#   env       nvidia-smi, versions, a bf16 matmul and a device copy (the peaks the MFU/bandwidth figures use)
#   smoke     the engine on CUDA: llama-small LoRA + full, bf16, ZeRO-2, a few steps (the CUDA code paths run)
#   lora7b    7B-shape LoRA r=64 + embed_tokens/lm_head, seq 2048, ZeRO-2, bf16 vs transformers.Trainer
#             (targets: >= 1.5x HF Trainer, >= 40 % MFU)
#   loss7b    the same job with the HF-logits loss instead of the chunked one (what the chunked loss buys)
#   compile7b the same job with torch.compile'd decoder layers (compile=true; keep it as default if it wins)
#   full1b    1B-shape full fine-tune, seq 2048, ZeRO-2 vs HF Trainer (target >= 45 % MFU)
#   fit24     7B LoRA + embeddings, micro batch 1, gradient checkpointing (every layer, then every 2nd), the
#             allocator capped at 23 GiB whatever the card (--memory_gb 23: a 24 GB card less its CUDA context)
#   fit24off  the fit24 job with ds_configs/zero2_offload.json (optimizer states in CPU memory: DeepSpeedCPUAdam)
#   decode    7B bf16 decoding, batch 1 and 16, vs model.generate defaults and the bandwidth bound (>= 60 %)
#   varlen    doc_attention=block on CUDA: the flash-varlen kernel test, then 1B full at seq 2048 with the 4D mask
#             (sdpa) vs document bounds (attn_implementation=varlen)
#
# On the device machine (no deepspeed in its image), carry the wheels made by scripts/device_wheels.sh:
#   run(carry=[".whl"], command="bash benchmarks/gpu_suite.sh env smoke")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}   # FusedAdam JIT build, once per machine
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "gpu_suite: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "gpu_suite: deepspeed is not importable and there is no .whl/ (run scripts/device_wheels.sh here first)" >&2
    exit 1
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

tt() { "$PY" -m benchmarks.train_throughput "$@"; }
TT7="--model llama2-7b --train_type lora --lora_r 64 --seq_len 2048 --zero 2 --precision bf16"

for part in "$@"; do
  echo "=== $part ($(date -u +%FT%TZ))"
  case "$part" in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      "$PY" - <<'PYEOF'
import json, time, torch, transformers, peft, deepspeed
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "peft": peft.__version__, "deepspeed": deepspeed.__version__,
                  "device": torch.cuda.get_device_name(0)}))
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"bf16 8192^3 matmul: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
x = torch.empty(2**31, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"device copy: {2 * x.numel() / dt / 1e12:.2f} TB/s (read + write)")
PYEOF
      ;;
    smoke)
      tt --model llama-small --train_type lora --seq_len 1024 --micro_batch 8 --zero 2 --steps 5 --warmup 2 \
         --precision bf16 --compare hf_trainer --output "$OUT/tt_small_lora.json"
      tt --model llama-small --train_type full --seq_len 1024 --micro_batch 8 --zero 2 --steps 5 --warmup 2 \
         --precision bf16 --output "$OUT/tt_small_full.json"
      ;;
    lora7b)
      tt $TT7 --micro_batch 4 --steps 12 --warmup 3 --compare hf_trainer --output "$OUT/tt_7b_lora.json" ;;
    loss7b)
      tt $TT7 --micro_batch 4 --steps 12 --warmup 3 --loss hf --output "$OUT/tt_7b_lora_hfloss.json" ;;
    compile7b)
      tt $TT7 --micro_batch 4 --steps 12 --warmup 3 --compile true --output "$OUT/tt_7b_lora_compile.json" ;;
    full1b)
      tt --model llama-1b --train_type full --seq_len 2048 --micro_batch 8 --zero 2 --precision bf16 --steps 12 \
         --warmup 3 --compare hf_trainer --output "$OUT/tt_1b_full.json" ;;
    fit24)
      tt $TT7 --micro_batch 1 --gradient_checkpointing true --memory_gb 23 --steps 4 --warmup 1 \
         --output "$OUT/tt_7b_lora_24gb.json"
      tt $TT7 --micro_batch 1 --gradient_checkpointing true --gradient_checkpointing_every 2 --memory_gb 23 \
         --steps 4 --warmup 1 --output "$OUT/tt_7b_lora_24gb_ck2.json" ;;
    fit24off)
      tt $TT7 --ds_config ds_configs/zero2_offload.json --micro_batch 1 --gradient_checkpointing true --memory_gb 23 \
         --steps 4 --warmup 1 --output "$OUT/tt_7b_lora_24gb_offload.json" ;;
    decode)
      for b in 1 16; do
        "$PY" -m benchmarks.generate_speed --model llama2-7b --batch $b --new_tokens 128 --repeats 2 \
          --output "$OUT/gen_7b_b$b.json"
      done ;;
    varlen)
      "$PY" -m pytest -q -p no:cacheprovider tests/test_train_attention.py
      for a in sdpa varlen; do
        tt --model llama-1b --train_type full --seq_len 2048 --micro_batch 8 --zero 2 --precision bf16 --steps 10 \
           --warmup 3 --doc_attention block --attn_implementation $a --output "$OUT/tt_1b_full_block_$a.json"
      done ;;
    *) echo "gpu_suite: unknown part '$part' (env smoke lora7b loss7b compile7b full1b fit24 fit24off decode varlen)" >&2; exit 2 ;;
  esac
done

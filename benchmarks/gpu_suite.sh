#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in parts that each fit one 10-minute device command.
#
#   bash benchmarks/gpu_suite.sh PART [PART ...]        # results (JSON + suite.log) under $OUT (default outputs/gpu)
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
# The suite ends with `python -m benchmarks.gpu_report $KEEP`: its JSONs are also copied to KEEP (default
# outputs/gpu_all, git-ignored, kept on a warm device machine between calls while each call's $OUT starts empty), so
# the report covers this call's and earlier calls' parts: the targets and the A/B pairs, as markdown in suite.log.
# A part whose job runs out of memory (train_throughput exit 3: a "fits": false JSON) is named under "did not fit";
# a part that fails otherwise under "failed in" (exit 1). The other parts still run. Exit 3 = only "did not fit".
#
# On the device machine (no deepspeed in its image), carry the wheels made by scripts/device_wheels.sh:
#   run(carry=[".whl"], command="bash benchmarks/gpu_suite.sh env smoke")
#
# REHEARSE=1 runs every part at CPU size (llama-tiny, fp32 or REHEARSE_PRECISION=bf16, seq 256, a few steps, no
# GPU-only flags) with the same flags otherwise: run it before spending device minutes, ideally in a venv like the
# device image's (Python 3.12, its torch/transformers, .whl installed as below) -- see benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS="env smoke lora7b loss7b compile7b full1b fit24 fit24off decode varlen"
for part in "$@"; do   # a typo is refused before any part runs (device minutes are scarce)
  case " $PARTS " in *" $part "*) ;; *) echo "gpu_suite: unknown part '$part' ($PARTS)" >&2; exit 2 ;; esac
done
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu_suite.sh PART [PART ...]   ($PARTS)" >&2; exit 2; }
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/suite.log") 2>&1   # the whole log comes back with the JSONs, even from a call cut off at its limit
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT   # the log is complete when the script returns
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1   # no progress bars in a log read afterwards
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}   # FusedAdam JIT build, once per machine
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python

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

FAILED="" NOFIT=""
run_py() {   # a failed run is reported at the end (each part once); the next one still runs
  local rc=0
  "$PY" "$@" || rc=$?
  if [ "$rc" = 3 ]; then   # train_throughput: ran out of memory -- a "fits": false verdict, its JSON is in $OUT
    case " $NOFIT " in *" $part "*) ;; *) NOFIT="$NOFIT $part" ;; esac
  elif [ "$rc" != 0 ]; then
    case " $FAILED " in *" $part "*) ;; *) FAILED="$FAILED $part" ;; esac
  fi
}
tt() { run_py -m benchmarks.train_throughput "$@"; }
# the GPU sizes; REHEARSE=1: the same runs at CPU size
M7B=llama2-7b M1B=llama-1b MSMALL=llama-small PREC=bf16 SEQ=2048 SEQ_SMALL=1024 MB7=4 MB8=8 STEPS=12 WARM=3
SMOKE_STEPS=5 CAP="--memory_gb 23" NEW_TOKENS=128
KEEP=${KEEP:-outputs/gpu_all}
if [ "${REHEARSE:-0}" = 1 ]; then
  [ "$KEEP" = outputs/gpu_all ] && KEEP=outputs/gpu_rehearsal_all   # CPU figures never join the GPU ones
  M7B=llama-tiny M1B=llama-tiny MSMALL=llama-tiny PREC=${REHEARSE_PRECISION:-fp32} SEQ=256 SEQ_SMALL=256 MB7=2 MB8=2 STEPS=3 WARM=1
  SMOKE_STEPS=3 CAP="" NEW_TOKENS=16
fi
TT7="--model $M7B --train_type lora --lora_r 64 --seq_len $SEQ --ds_config ds_configs/zero2.json --precision $PREC"

for part in "$@"; do
  echo "=== $part ($(date -u +%FT%TZ))"
  case "$part" in
    env)
      command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      run_py - <<'PYEOF'
import json, time, torch, transformers, peft, deepspeed
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "peft": peft.__version__, "deepspeed": deepspeed.__version__,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}))
if not torch.cuda.is_available():
    raise SystemExit(0)
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
      tt --model $MSMALL --train_type lora --seq_len $SEQ_SMALL --micro_batch_size $MB8 --ds_config ds_configs/zero2.json --steps $SMOKE_STEPS --warmup 2 \
         --precision $PREC --compare hf_trainer --output "$OUT/tt_small_lora.json"
      tt --model $MSMALL --train_type full --seq_len $SEQ_SMALL --micro_batch_size $MB8 --ds_config ds_configs/zero2.json --steps $SMOKE_STEPS --warmup 2 \
         --precision $PREC --output "$OUT/tt_small_full.json"
      ;;
    lora7b)
      tt $TT7 --micro_batch_size $MB7 --steps $STEPS --warmup $WARM --compare hf_trainer --output "$OUT/tt_7b_lora.json" ;;
    loss7b)
      tt $TT7 --micro_batch_size $MB7 --steps $STEPS --warmup $WARM --loss hf --output "$OUT/tt_7b_lora_hfloss.json" ;;
    compile7b)
      tt $TT7 --micro_batch_size $MB7 --steps $STEPS --warmup $WARM --compile true --output "$OUT/tt_7b_lora_compile.json" ;;
    full1b)
      tt --model $M1B --train_type full --seq_len $SEQ --micro_batch_size $MB8 --ds_config ds_configs/zero2.json --precision $PREC --steps $STEPS \
         --warmup $WARM --compare hf_trainer --output "$OUT/tt_1b_full.json" ;;
    fit24)
      tt $TT7 --micro_batch_size 1 --gradient_checkpointing true $CAP --steps 4 --warmup 1 \
         --output "$OUT/tt_7b_lora_24gb.json"
      tt $TT7 --micro_batch_size 1 --gradient_checkpointing true --gradient_checkpointing_every 2 $CAP \
         --steps 4 --warmup 1 --output "$OUT/tt_7b_lora_24gb_ck2.json" ;;
    fit24off)
      tt $TT7 --ds_config ds_configs/zero2_offload.json --micro_batch_size 1 --gradient_checkpointing true $CAP \
         --steps 4 --warmup 1 --output "$OUT/tt_7b_lora_24gb_offload.json" ;;
    decode)
      for b in 1 16; do
        run_py -m benchmarks.generate_speed --model $M7B --batch $b --new_tokens $NEW_TOKENS --repeats 2 \
          --output "$OUT/gen_7b_b$b.json"
      done ;;
    varlen)
      run_py -m pytest -q -p no:cacheprovider tests/test_train_attention.py
      for a in sdpa varlen; do
        tt --model $M1B --train_type full --seq_len $SEQ --micro_batch_size $MB8 --ds_config ds_configs/zero2.json --precision $PREC --steps $STEPS \
           --warmup $WARM --doc_attention block --attn_implementation $a --output "$OUT/tt_1b_full_block_$a.json"
      done ;;
  esac
done
echo "=== report ($(date -u +%FT%TZ))"
mkdir -p "$KEEP"
if ls "$OUT"/*.json >/dev/null 2>&1 && [ "$(cd "$OUT" && pwd -P)" != "$(cd "$KEEP" && pwd -P)" ]; then
  cp "$OUT"/*.json "$KEEP"/
fi
"$PY" -m benchmarks.gpu_report "$KEEP" || echo "gpu_suite: the report failed (the JSONs above are complete)" >&2
[ -z "$NOFIT" ] || echo "gpu_suite: did not fit (out of memory, see the JSON):$NOFIT" >&2
[ -z "$FAILED" ] || { echo "gpu_suite: failed in:$FAILED" >&2; exit 1; }
[ -z "$NOFIT" ] || exit 3

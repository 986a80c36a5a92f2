#!/usr/bin/env bash
# The GPU test suite, in one command, on the GPU host (or any machine with a CUDA GPU):
#
#     bench/gpu_tests.sh [WHEEL_DIR]
#
# WHEEL_DIR: optional folder of py3 wheels for what the host lacks (pydantic, hypothesis, ...),
# installed with --no-index into a scratch site folder (the host is air-gapped). Runs every test
# marked `gpu` (kernels against their torch references at DeepSeek-V3 shapes, the sampler, the
# worker's GPU path with CUDA graphs, the model's kernel backend) and prints pytest's summary.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -ge 1 ] && [ -d "$1" ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$1"/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_tests.sh: no CUDA GPU visible to torch')" || exit 2
exec python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
  tests/kernels tests/sampling/test_sampler_gpu.py tests/worker tests/model

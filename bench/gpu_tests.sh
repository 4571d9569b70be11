#!/usr/bin/env bash
# The test files that matter on the device image (torch 2.11, CUDA, Python 3.12): the GPU-only tests with the
# GPU visible, then the pipeline and trainer-layout tests on CPU (gloo) to check the torch version the GPU
# machines run. Device tool, carrying .whl (from ../shared/tools/device-wheels.sh pytest==8.4.2 pluggy
# iniconfig packaging tqdm):   bash bench/gpu_tests.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
echo "== GPU tests"
timeout 280 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_lightning_triton.py \
  tests/test_softmax_attention.py tests/test_activation_memory.py tests/test_linear_cross_entropy.py \
  tests/test_model.py tests/test_generate.py
echo "== GPU tests exit code $?"
echo "== CPU (gloo) tests under this torch"
CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 timeout 280 "$PYTHON" -m pytest -q -p no:cacheprovider -x \
  tests/test_pipeline.py tests/test_tensor_parallel.py tests/test_data_parallel.py
echo "== CPU tests exit code $?"

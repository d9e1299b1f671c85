#!/usr/bin/env bash
# The one prepared GPU check (run through the device tool on an H100/H200 machine):
#   1. CUDA correctness of the fused path, with torch.cuda.set_sync_debug_mode("error") around
#      its forward and backward (tests/test_cuda.py) and the fused == reference suite;
#   2. the benchmark on CUDA (CUDA events, max_memory_allocated) at the ACDC-like, LA-like and
#      large 3D shapes.
# Output goes to $OUT (the device tool brings it back); copy it into benchmarks/results/.
set -uo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$out/gpu-env.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu-tests.txt"
# 3 rounds x 10 runs: every round of reference+compile compiles afresh (inductor, tens of
# seconds on a GPU machine), and the device tool allows 10 minutes per command
python3 benchmarks/bench_losses.py --device cuda --rounds 3 --repeats 10 \
  --out "$out/cuda-$(date +%F).md" 2>&1 | tail -n 80

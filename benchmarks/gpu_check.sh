#!/usr/bin/env bash
# The one prepared GPU check (run through the device tool on an H100/H200 machine), at the
# final commit, in about 8 minutes:
#   1. CUDA correctness of the default path (the accelerator engine) and of bidirectional_loss,
#      under torch.cuda.set_sync_debug_mode("error") (tests/test_cuda.py);
#   2. the launch counts on the GPU: the dispatcher's ops (as on meta) and the kernels the
#      profiler sees the device run, for MONAI, the reference and the default path;
#   3. the benchmark on CUDA (CUDA events, max_memory_allocated) at the ACDC-like, LA-like and
#      large 3D shapes, with the GPU verdicts (default path <= 0.5x MONAI and <= the compiled
#      reference, peak <= 3x the logits, bidirectional_loss <= 1.5x one MONAI DiceCELoss).
# Output goes to $OUT (the device tool brings it back); copy it into benchmarks/results/.
set -uo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$out/gpu-env.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu-tests.txt"
python3 benchmarks/launches.py --device cuda --variants monai,reference,fused,bidirectional,monai-plain-bidirectional \
  --out "$out/launches-cuda-$(date +%F).md" 2>&1 | tail -n 30
# 3 rounds x 10 runs: every round of reference+compile compiles afresh (inductor, tens of
# seconds on a GPU machine), and the device tool allows 10 minutes per command
python3 benchmarks/bench_losses.py --device cuda --rounds 3 --repeats 10 \
  --out "$out/cuda-$(date +%F).md" 2>&1 | tail -n 80

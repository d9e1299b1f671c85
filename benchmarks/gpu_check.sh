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
# 4. the example trainer's two protocols on the GPU (issue 14, item 7): seconds per iteration of
#    every method at their own sizes (ACDC 24 x 256 x 256, LA 4 x 112 x 112 x 80) with bf16
#    autocast, then a short real run of each on the fixture folders, fp16 with its GradScaler
python3 benchmarks/trainer_steps.py --device cuda --amp bf16 --steps 10 --warmup 3 \
  --out "$out/trainer-steps-cuda-$(date +%F).md" 2>&1 | tail -n 16
python3 -m examples.bual_demo.fixtures acdc /tmp/gpu-acdc > /dev/null
python3 -m examples.bual_demo.fixtures la /tmp/gpu-la > /dev/null
python3 -m examples.bual_demo --ssl4mis-acdc /tmp/gpu-acdc --labeled-cases 2 --iterations 100 \
  --device cuda --amp fp16 --workers 1 --no-diagnostics --out "$out/acdc-gpu" 2>&1 | tail -n 12
python3 -m examples.bual_demo --ssl4mis-la /tmp/gpu-la --labeled-cases 2 --iterations 50 \
  --patch-size 48 48 32 --device cuda --amp fp16 --workers 1 --no-diagnostics \
  --out "$out/la-gpu" 2>&1 | tail -n 12

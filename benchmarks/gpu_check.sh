#!/usr/bin/env bash
# The prepared device run for issues #18, #19, #29 and #30, sized for one call of the `device` tool (~10 minutes
# on an H100/H200; each step has its own time limit): the CUDA paths checked against their references
# first, then the measurements, each writing its JSON as it goes, so a cut-off run keeps what it
# measured. Results land in $OUT.
#   OUT=$OUT bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# 0. #29: registers and spills of every tile-kernel launch configuration (compiled for sm_80/sm_90; no GPU needed)
timeout 120 python benchmarks/kernel_resources.py > "$OUT/kernel_resources.md" 2>&1; tail -3 "$OUT/kernel_resources.md"
# 1. correctness on CUDA, one time limit per file sized for a cold machine, no -x: every failure listed.
#    The tile kernel vs the canvas (and the start-up self-test), nvJPEG decode vs the CPU path, and (#30)
#    the corrupt JPEG on the device: libjpeg rejects it, so nvJPEG must not pass a garbage decode as good.
for f in tests/test_triton_dwconv.py tests/test_gpu_decode.py; do
  TRITON_INTERPRET=0 timeout 150 python -m pytest -q -rf "$f" 2>&1 | tail -20 | tee -a "$OUT/tests.txt"
done
# 2. #19: the step against MAE, tile kernel vs canvas, compiled, MFU against the H100 SXM bf16 peak,
#    and the profile of each compiled variant (top kernels by self time)
timeout 200 python benchmarks/step_time.py --device cuda --models tiny base --batch-sizes 128 --dtypes bf16 \
    --variants sparse sparse-canvas unmasked mae --compile --only-compiled --warmup 3 --repeats 5 \
    --peak-tflops 989 --profile 3 --json "$OUT/step_time.json" > "$OUT/step_time.txt" 2>&1
tail -12 "$OUT/step_time.txt"
# 3. #18/#30: loader alone by pipeline and workers (with the main process's host ms per batch), then end
#    to end vs step-only (tiny, compiled): the decode thread must keep the loop within 5% of step-only
timeout 100 python benchmarks/loader_rate.py --make-jpegs 12000 --cache "$OUT/jpegs" --workers 4,8,15 \
    --decode cpu,gpu --batch 128 --batches 20 --json "$OUT/loader.json" 2>&1 | tail -10 | tee "$OUT/loader.txt"
timeout 150 python benchmarks/pretrain_rate.py --root "$OUT/jpegs" --out "$OUT/runs" --model tiny --batch 128 \
    --workers 4 --decode cpu,gpu --compile --step-only --json "$OUT/e2e_tiny.json" 2>&1 | tail -8 | tee "$OUT/e2e.txt"
# 4. #30: host-device syncs per training step (the loop reads a step's values a step late; none between log steps)
timeout 90 python benchmarks/host_syncs.py --model tiny --batch 64 --steps 24 --log-every 8 \
    --json "$OUT/host_syncs.json" 2>&1 | tail -26 | tee "$OUT/host_syncs.txt"

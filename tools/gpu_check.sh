#!/usr/bin/env bash
# Run ON the lent GPU machine (device tool), after tools/gpu_wheels.sh here and with `.whl` carried:
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=590)
# Checks fp16/bf16 training on CUDA (pytest -m gpu), a 2-GPU data-parallel job when there are 2 or more GPUs, and
# takes the bench figures on the GPU; everything it prints
# is also written under $OUT (or gpu-check-out/). A dry run here: GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_SETTINGS=mid.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -c "import os, torch, diffusers, transformers
assert torch.cuda.is_available() or os.environ.get('GPU_CHECK_ALLOW_CPU'), 'no CUDA device';
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1 | tee "$out/versions.txt" || exit 1
status=0
python3 -m pytest -q -m gpu tests/test_train_gpu.py -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt" || status=1
# Data-parallel: a job given 2 GPUs by the scheduler (NCCL, fp16); the test prints its figures.
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ]; then
  python3 -m pytest -q -s -m gpu tests/test_train_distributed.py -p no:cacheprovider 2>&1 | tee "$out/pytest-2gpu.txt" \
    || status=1
else
  echo "2-GPU job skipped: nvidia-smi lists $gpus GPU(s)" | tee "$out/pytest-2gpu.txt"
fi
for setting in ${GPU_CHECK_SETTINGS:-full sdxl}; do
  python3 bench/train_bench.py --setting "$setting" --file-dtype fp16 --cache /tmp/bench-cache 2>"$out/bench-$setting.err" \
    | tee "$out/bench-$setting.json" || { status=1; tail -20 "$out/bench-$setting.err"; }
done
exit $status

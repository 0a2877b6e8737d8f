#!/usr/bin/env bash
# The GPU checks and benchmarks as one prepared command, for a session lent a GPU for a few minutes.
#
#     bash scripts/gpu_session.sh                 # at most 8 minutes (the steps' limits); logs under $OUT (else gpu-out/)
#     PYTHON=.venv/bin/python DEVICE=cpu QUICK=1 bash scripts/gpu_session.sh   # the same steps on the CPU, small: a dry run
#
# Needs torch, transformers, accelerate, einops and scikit-learn in $PYTHON (default python3; the
# device machines' image has them; datasets, jinja2 and the GGUF model are not needed here).
# Each step has its own time limit and the next one runs whatever the last gave, so one failure
# costs one step, not the lease. Steps:
#   1. versions and the device;
#   2. scripts/check_gpu.py: float32 on the GPU = on the CPU, bf16 against float32, peak memory;
#   3. scripts/bench_engine.py --device $DEVICE at N = 256 (fit, scoring, self-influence as ratios to an epoch);
#   4. the same at N = 3,072 without the step-by-step breakdown.
# The 2-GPU FSDP check (`torchrun --nproc_per_node 2 scripts/check_gpu.py --fsdp`) needs a machine of two GPUs.
set -uo pipefail
out=$(realpath -m "${OUT:-gpu-out}")  # relative to where it was called from
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
quick=${QUICK:+--quick}  # N = 64, T = 64, each stage once
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0

step() {  # step <name> <seconds> <command...>: run it with a time limit, its output to the screen and $out/<name>.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"  # SIGKILL 10 s after the limit: a hung CUDA call too
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name ended with status $rc"; status=1; }
}

step versions 60 "$python" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'accelerate', accelerate.__version__, 'device',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
command -v nvidia-smi >/dev/null && nvidia-smi >"$out/nvidia-smi.txt" 2>&1
step check_gpu 150 "$python" scripts/check_gpu.py --out "$out/check-gpu"
step bench_engine_256 150 "$python" scripts/bench_engine.py --device "$device" --no-full-rank-128 --repeats 2 --retries 0 \
  $quick
step bench_engine_3072 120 "$python" scripts/bench_engine.py --device "$device" --sequences 3072 --no-breakdown \
  --no-full-rank-128 --repeats 1 --retries 0 $quick
rm -rf "$out/check-gpu"  # the reference tensors: only the 2-GPU check reads them
exit $status

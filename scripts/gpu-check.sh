#!/usr/bin/env bash
# Every GPU test and the GPU benchmarks, on a machine with an NVIDIA GPU (the device checks of issue 7).
# Each GPU test fails (instead of skipping) when no GPU can be used (SWITCHYARD_REQUIRE_GPU=1); logs and
# JSON go to ${OUT:-out/gpu-check}.
#
#   bash scripts/gpu-check.sh            # on a GPU machine with Rust: builds, then runs
#   bash scripts/gpu-bins.sh BIN         # here, for a GPU machine without Rust: builds and collects the binaries
#   bash scripts/gpu-check.sh BIN        # there: runs them
#
# NVRTC 13, cuBLAS 13 and libnccl 2 are looked for under /usr and /opt (e.g. the nvidia-* wheels of a
# PyTorch install) unless SWITCHYARD_NVRTC_LIB / SWITCHYARD_NCCL_LIB / LD_LIBRARY_PATH already say where.
# TORCH_PYTHON (default python3, skipped when it has no CUDA torch) runs the same layer in PyTorch on the
# same GPU beside each benchmark; ITERATIONS (default 10) timed iterations per benchmark.
set -u
out="${OUT:-out/gpu-check}"
mkdir -p "$out"
if [ $# -ge 1 ]; then
  bin="$1"
else
  bin=target/gpu-check-bin
  bash "$(dirname "$0")/gpu-bins.sh" "$bin" > "$out/build.log" 2>&1 || { tail -n 20 "$out/build.log"; exit 1; }
fi
iterations="${ITERATIONS:-10}"
py="${TORCH_PYTHON:-python3}"
status=0
step() { # name, seconds, command...: output to $out/name.log
  local name="$1" secs="$2"; shift 2
  echo "== $(date +%T) $name"
  if timeout "$secs" "$@" > "$out/$name.log" 2>&1; then
    echo "   ok"; grep -h "test result" "$out/$name.log"
  else
    echo "   FAILED (see $out/$name.log)"; tail -n 20 "$out/$name.log"; status=1
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
find_lib() { find /usr /opt -xdev -name "$1" 2>/dev/null | sort | head -n 1; }
[ -n "${SWITCHYARD_NVRTC_LIB:-}" ] || SWITCHYARD_NVRTC_LIB=$(find_lib 'libnvrtc.so.13*')
[ -n "${SWITCHYARD_NCCL_LIB:-}" ] || SWITCHYARD_NCCL_LIB=$(find_lib 'libnccl.so.2*')
cublas=$(find_lib 'libcublas.so.13*')
for l in "$SWITCHYARD_NVRTC_LIB" "$cublas" "$SWITCHYARD_NCCL_LIB"; do
  [ -n "$l" ] && LD_LIBRARY_PATH="$(dirname "$l")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
echo "nvrtc: ${SWITCHYARD_NVRTC_LIB:-none}; cublas: ${cublas:-none}; nccl: ${SWITCHYARD_NCCL_LIB:-none}"
export LD_LIBRARY_PATH SWITCHYARD_NVRTC_LIB SWITCHYARD_NCCL_LIB
export SWITCHYARD_REQUIRE_GPU=1 SWITCHYARD_REQUIRE_NVRTC=1 RUST_BACKTRACE=1

step kernels-nvrtc 120 "$bin/kernels_cuda_nvrtc" --nocapture
step kernels-gpu-tests 300 "$bin/kernels_cuda_gpu" --test-threads 1 --nocapture
step kernels-cuda-unit 120 "$bin/kernels_lib" cuda:: --nocapture
step runtime-gpu-unit 300 "$bin/runtime_lib" --test-threads 1 cuda exec nccl --nocapture
step runtime-gpu-tests 300 "$bin/runtime_train" --test-threads 1 gpu nccl --nocapture

torch=()
if "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  torch=(--torch-python "$py")
else
  echo "no CUDA PyTorch at $py: the benchmarks run without the PyTorch comparison"
fi
# Issue 5's two shapes, and one big enough for the GPU (launches no longer dominate).
for shape in "--tokens 4096 --d-model 512 --d-ffn 2048 --experts 8 --capacity-factor 1.25" \
             "--tokens 8192 --d-model 1024 --d-ffn 4096 --experts 16 --capacity-factor 1.0" \
             "--tokens 32768 --d-model 2048 --d-ffn 8192 --experts 16 --capacity-factor 1.0"; do
  name="bench-kernels-cuda-$(echo "$shape" | awk '{print $2"-"$4}')"
  # shellcheck disable=SC2086
  step "$name" 300 "$bin/switchyard" bench kernels --device cuda $shape --top-k 2 --iterations "$iterations" \
    "${torch[@]}" --json
done
step train-cuda 300 "$bin/switchyard" train --device cuda --workers 4 --experts 16 --top-k 2 --dyn 10 --steps 60 --seed 7 --json
step train-cpu 300 "$bin/switchyard" train --device cpu --workers 4 --experts 16 --top-k 2 --dyn 10 --steps 60 --seed 7 --json
if [ "$gpus" -ge 2 ]; then
  step train-nccl 300 "$bin/switchyard" train --device cuda --comm nccl --workers 2 --experts 16 --top-k 2 --dyn 10 --steps 60 --seed 7 --json
  step train-cuda-2 300 "$bin/switchyard" train --device cuda --comm local --workers 2 --experts 16 --top-k 2 --dyn 10 --steps 60 --seed 7 --json
  step profile-nccl 300 "$bin/switchyard" profile --device cuda --workers 2 --out "$out/profile-gpu2.json" --json
fi
step profile-gpu 300 "$bin/switchyard" profile --device cuda --out "$out/profile-gpu.json" --json
tail -n 1 "$out"/train-*.log
exit $status

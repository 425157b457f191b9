#!/usr/bin/env bash
# Every GPU test and the GPU benchmarks, on a machine with an NVIDIA GPU (the device checks of issue 7).
# Writes logs and JSON to ${OUT:-out/gpu-check}; each GPU test fails (instead of skipping) when no GPU can be used.
#   bash scripts/gpu-check.sh            # after `cargo build --release`
set -uo pipefail
out="${OUT:-out/gpu-check}"
mkdir -p "$out"
export SWITCHYARD_REQUIRE_GPU=1
bin=target/release/switchyard
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
cargo build --release 2>&1 | tail -n 2
status=0
step() { # name, command...
  local name="$1"; shift
  echo "== $name"
  if "$@" > "$out/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $out/$name.log)"; tail -n 20 "$out/$name.log"; status=1; fi
}
step kernels-gpu-tests cargo test --release -p switchyard-kernels --test cuda_gpu -- --nocapture
step kernels-nvrtc cargo test --release -p switchyard-kernels --test cuda_nvrtc -- --nocapture
step runtime-gpu-tests cargo test --release -p switchyard-runtime gpu -- --nocapture
step cli-device-tests cargo test --release --test train_cli --test bench_cli device -- --nocapture
for shape in "--tokens 4096 --d-model 512 --d-ffn 2048 --experts 8 --capacity-factor 1.25" \
             "--tokens 8192 --d-model 1024 --d-ffn 4096 --experts 16 --capacity-factor 1.0"; do
  name="bench-kernels-cuda-$(echo "$shape" | awk '{print $2"-"$4}')"
  # shellcheck disable=SC2086
  step "$name" "$bin" bench kernels --device cuda $shape --top-k 2 --iterations 20 --json
  cp "$out/$name.log" "$out/$name.json"
done
step train-cuda "$bin" train --device cuda --workers 4 --experts 16 --top-k 2 --dyn 10 --steps 50 --seed 7 --json
step train-cpu "$bin" train --device cpu --workers 4 --experts 16 --top-k 2 --dyn 10 --steps 50 --seed 7 --json
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ]; then
  step train-nccl "$bin" train --device cuda --comm nccl --workers 2 --experts 16 --top-k 2 --dyn 10 --steps 50 --seed 7 --json
  step train-cuda-2 "$bin" train --device cuda --comm local --workers 2 --experts 16 --top-k 2 --dyn 10 --steps 50 --seed 7 --json
  step profile-nccl "$bin" profile --device cuda --workers 2 --out "$out/profile-gpu2.json"
fi
step profile-gpu "$bin" profile --device cuda --out "$out/profile-gpu.json"
tail -n 1 "$out"/train-*.log
exit $status

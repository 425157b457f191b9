#!/usr/bin/env bash
# Runs the kernel benchmark on the two shapes of issue 5 with 1 and 2 threads, for the default
# (pure-Rust GEMM) build and, if libopenblas is installed, the `blas` build, each RUNS times,
# with the PyTorch comparison when TORCH_PYTHON points at a python with torch.
#
# Usage: kernels/bench/run_benchmarks.sh OUT_DIR [RUNS]
#   env: TORCH_PYTHON=/tmp/torchvenv/bin/python (optional; see setup_torch_venv.sh)
#        ITERATIONS (default 3), WARMUP (default 1), SHAPES ("1 2"), THREADS ("1 2"),
#        BACKENDS ("pure-rust blas")
# The machine may be shared: before each run it waits (up to 10 minutes) until no compiler runs.
set -euo pipefail
OUT="${1:?usage: run_benchmarks.sh OUT_DIR [RUNS]}"
RUNS="${2:-2}"
ITERATIONS="${ITERATIONS:-3}"
WARMUP="${WARMUP:-1}"
SHAPES="${SHAPES:-1 2}"
THREADS="${THREADS:-1 2}"
BACKENDS="${BACKENDS:-pure-rust blas}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
mkdir -p "$OUT"

build() { # $1 = target dir, rest = cargo flags
    local dir="$1"; shift
    (cd "$ROOT" && CARGO_TARGET_DIR="$dir" cargo build --release -q -p switchyard-kernels --example kernel_bench "$@")
}
build /tmp/target-kernels
if [[ " $BACKENDS " == *" blas "* ]]; then
    build /tmp/target-kernels-blas --features blas
fi

wait_quiet() {
    for _ in $(seq 120); do
        if ! pgrep -x rustc >/dev/null && ! pgrep -x cc1 >/dev/null; then return; fi
        sleep 5
    done
}

shape_args() {
    case "$1" in
        1) echo "--tokens 4096 --d-model 512 --d-ffn 2048 --experts 8 --top-k 2 --capacity-factor 1.25" ;;
        2) echo "--tokens 8192 --d-model 1024 --d-ffn 4096 --experts 16 --top-k 2 --capacity-factor 1.0" ;;
    esac
}

for run in $(seq "$RUNS"); do
    for shape in $SHAPES; do
        for threads in $THREADS; do
            for backend in $BACKENDS; do
                bin=/tmp/target-kernels/release/examples/kernel_bench
                [[ "$backend" == blas ]] && bin=/tmp/target-kernels-blas/release/examples/kernel_bench
                torch=()
                # torch is measured once per (shape, threads), beside the pure-Rust run.
                if [[ -n "${TORCH_PYTHON:-}" && "$backend" == pure-rust ]]; then
                    torch=(--torch-python "$TORCH_PYTHON")
                fi
                wait_quiet
                f="$OUT/shape${shape}_t${threads}_${backend}_run${run}.json"
                echo "$(date +%T) load $(cut -d' ' -f1 /proc/loadavg): $f" >&2
                # shellcheck disable=SC2046
                "$bin" $(shape_args "$shape") --threads "$threads" --backend "$backend" \
                    --iterations "$ITERATIONS" --warmup "$WARMUP" "${torch[@]}" > "$f"
            done
        done
    done
done

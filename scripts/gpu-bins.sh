#!/usr/bin/env bash
# Builds (release) and collects into BIN_DIR, stripped, the binaries scripts/gpu-check.sh runs on a
# GPU machine (which may have no Rust): the switchyard CLI and the test binaries with GPU tests.
#   bash scripts/gpu-bins.sh BIN_DIR
set -euo pipefail
BIN=${1:?usage: gpu-bins.sh BIN_DIR}
mkdir -p "$BIN"
cargo build --release --bin switchyard
cp target/release/switchyard "$BIN/switchyard"
cargo test --release --no-run --message-format=json -p switchyard-kernels -p switchyard-runtime 2>/dev/null |
    python3 -c '
import json, sys, shutil
want = {("switchyard-kernels", "lib"): "kernels_lib", ("cuda_gpu", "test"): "kernels_cuda_gpu",
        ("cuda_nvrtc", "test"): "kernels_cuda_nvrtc", ("switchyard-runtime", "lib"): "runtime_lib",
        ("train", "test"): "runtime_train"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    key = (m["target"]["name"].replace("_", "-") if m["target"]["kind"] == ["lib"] else m["target"]["name"],
           m["target"]["kind"][0])
    if key in want:
        shutil.copy(m["executable"], sys.argv[1] + "/" + want.pop(key))
if want:
    sys.exit(f"not built: {sorted(want.values())}")
' "$BIN"
strip "$BIN"/*
ls -la "$BIN"

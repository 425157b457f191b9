#!/usr/bin/env python3
"""Summarises the JSON reports written by run_benchmarks.sh as a Markdown table.

Usage: kernels/bench/summarize.py OUT_DIR
For each (shape, threads, backend) the run with the shortest forward+backward is shown ("best
run"), with the number of runs; times are each run's fastest iteration (rates and ratios use them);
the PyTorch table comes from the torch sections of the pure-Rust runs.
"""
import glob
import json
import os
import re
import sys


def main():
    out = sys.argv[1]
    rows = {}
    for f in sorted(glob.glob(os.path.join(out, "*.json"))):
        m = re.match(r"shape(\d)_t(\d+)_([a-z-]+)_run(\d+)\.json", os.path.basename(f))
        if not m:
            continue
        try:
            r = json.load(open(f))
        except json.JSONDecodeError:
            continue
        key = (int(m.group(1)), int(m.group(2)), m.group(3))
        rows.setdefault(key, []).append(r)
    print("| shape | threads | backend | runs | fwd ms (best) | fwd+bwd ms (best) | expert GFLOP/s fwd | expert GFLOP/s fwd+bwd "
          "| plain GEMM GFLOP/s | fwd ratio | fwd+bwd ratio | dropped |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    torch_rows = []
    for key in sorted(rows):
        runs = rows[key]
        best = min(runs, key=lambda r: r["fwd_bwd_ms_min"])
        c = best["config"]
        shape = f'T{c["tokens"]} d{c["d_model"]} h{c["d_ffn"]} E{c["experts"]} k{c["top_k"]} C{c["capacity_factor"]}'
        print(f'| {shape} | {key[1]} | {best["backend"]} | {len(runs)} | {best["forward_ms_min"]:.1f} | '
              f'{best["fwd_bwd_ms_min"]:.1f} | {best["expert_gemm_gflops_forward"]:.1f} | '
              f'{best["expert_gemm_gflops_fwd_bwd"]:.1f} | {best["plain_gemm_gflops"]:.1f} | '
              f'{best["fwd_ratio_to_gemm"]:.3f} | {best["fwd_bwd_ratio_to_gemm"]:.3f} | {best["dropped_tokens"]} |')
        ts = [r for r in runs if r.get("torch")]
        if ts:
            bt = min(ts, key=lambda r: r["torch"]["fwd_bwd_ms_min"])
            torch_rows.append((shape, key[1], len(ts), bt["torch"]))
    if torch_rows:
        print()
        print("| shape | threads | runs | torch | fwd ms (best) | fwd+bwd ms (best) | expert GFLOP/s fwd+bwd (kept rows) "
              "| padded bmm GFLOP/s fwd+bwd | torch.mm GFLOP/s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for shape, threads, n, t in torch_rows:
            print(f'| {shape} | {threads} | {n} | {t["torch_version"]} | {t["forward_ms_min"]:.1f} | {t["fwd_bwd_ms_min"]:.1f} | '
                  f'{t["expert_gemm_gflops_fwd_bwd"]:.1f} | {t["padded_gemm_gflops_fwd_bwd"]:.1f} | '
                  f'{t["plain_gemm_gflops"]:.1f} |')


if __name__ == "__main__":
    main()

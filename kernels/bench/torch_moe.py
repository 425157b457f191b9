#!/usr/bin/env python3
"""The MoE layer of switchyard-kernels in plain PyTorch (CPU, or a GPU with --device cuda:N), for
`switchyard bench kernels`.

Gate (x @ Wg, softmax, top-k), capacity with dropping in arrival order (first choices before
second choices, as GShard/Tutel), scatter into an [experts, capacity, d] buffer, batched matmuls
(torch.bmm) for the expert FFNs, combine (weighted index_add). Times the forward (with autograd
recording, as in training) and forward+backward (median and fastest iteration; rates use the
fastest), and a plain torch.mm of [T*k, d] x [d, h].
On a GPU every timed region ends with torch.cuda.synchronize() and matrix products run in FP32
(TF32 off), as the CUDA benchmark of switchyard-kernels does.
Prints one JSON object on stdout.

Set up the interpreter with kernels/bench/setup_torch_venv.sh.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--activation", choices=["gelu", "swiglu"], default="gelu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    return p.parse_args()


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {a.device}: this PyTorch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_default_device(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    T, d, h, E, k = a.tokens, a.d_model, a.d_ffn, a.experts, a.top_k
    if not 1 <= k <= E:
        raise SystemExit(f"top-k {k} must be in 1..={E}")
    C = math.ceil(a.capacity_factor * T * k / E)
    swiglu = a.activation == "swiglu"
    hin = 2 * h if swiglu else h

    x = torch.randn(T, d, requires_grad=True)
    wg = (torch.randn(d, E) / math.sqrt(d)).requires_grad_()
    w1 = (torch.randn(E, d, hin) / math.sqrt(d)).requires_grad_()
    w2 = (torch.randn(E, h, d) / math.sqrt(h)).requires_grad_()
    params = [x, wg, w1, w2]
    if not swiglu:
        b1 = (torch.randn(E, 1, h) * 0.02).requires_grad_()
        b2 = (torch.randn(E, 1, d) * 0.02).requires_grad_()
        params += [b1, b2]
    grad_out = torch.randn(T, d)
    tok_of = torch.arange(T).repeat(k)  # assignment order: (choice j, token t)

    def layer():
        logits = x @ wg
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = torch.topk(probs, k, dim=-1)  # [T, k]
        e_flat = top_i.t().reshape(-1)  # first choices of all tokens, then second ...
        w_flat = top_p.t().reshape(-1)
        onehot = F.one_hot(e_flat, E)
        pos = ((torch.cumsum(onehot, 0) - 1) * onehot).sum(-1)
        keep = pos < C
        e_k, pos_k, tok_k, w_k = e_flat[keep], pos[keep], tok_of[keep], w_flat[keep]
        buf = x.new_zeros(E, C, d).index_put((e_k, pos_k), x[tok_k])  # scatter
        hid = torch.bmm(buf, w1)
        if swiglu:
            act = F.silu(hid[..., :h]) * hid[..., h:]
            y = torch.bmm(act, w2)
        else:
            act = F.gelu(hid + b1)
            y = torch.bmm(act, w2) + b2
        out = x.new_zeros(T, d).index_add(0, tok_k, y[e_k, pos_k] * w_k[:, None])  # combine
        return out, int(keep.sum())

    def step(backward):
        for p in params:
            p.grad = None
        out, kept = layer()
        if backward:
            out.backward(grad_out)
        return kept

    kept = 0
    for _ in range(a.warmup):
        kept = step(True)
    fwd, fwd_bwd = [], []
    sync()
    for _ in range(a.iterations):
        t = time.perf_counter()
        kept = step(False)
        sync()
        fwd.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        step(True)
        sync()
        fwd_bwd.append((time.perf_counter() - t) * 1e3)

    # Plain GEMM on the same threads: [T k, d] x [d, h].
    ga, gb = torch.randn(T * k, d), torch.randn(d, h)
    torch.mm(ga, gb)
    sync()
    mm = []
    for _ in range(max(3, a.iterations)):
        t = time.perf_counter()
        torch.mm(ga, gb)
        sync()
        mm.append((time.perf_counter() - t) * 1e3)

    per = 2.0 * d * h
    fwd_mult = 3.0 if swiglu else 2.0  # GEMMs of d x h per row in the forward
    useful_fwd = fwd_mult * per * kept
    padded_fwd = fwd_mult * per * E * C
    # Rates use the fastest iteration (the least disturbed on a shared machine), as the Rust side.
    fwd_ms, fwd_bwd_ms, mm_ms = min(fwd), min(fwd_bwd), min(mm)
    gf = lambda flop, ms: flop / (ms * 1e-3) / 1e9
    print(
        json.dumps(
            {
                "torch_version": torch.__version__,
                "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                "threads": torch.get_num_threads(),
                "capacity": C,
                "routed_tokens": kept,
                "forward_ms": statistics.median(fwd),
                "forward_ms_min": fwd_ms,
                "fwd_bwd_ms": statistics.median(fwd_bwd),
                "fwd_bwd_ms_min": fwd_bwd_ms,
                "expert_gemm_gflops_forward": gf(useful_fwd, fwd_ms),
                "expert_gemm_gflops_fwd_bwd": gf(3 * useful_fwd, fwd_bwd_ms),
                "padded_gemm_gflops_fwd_bwd": gf(3 * padded_fwd, fwd_bwd_ms),
                "plain_gemm_gflops": gf(per * T * k, mm_ms),
            }
        )
    )


if __name__ == "__main__":
    main()

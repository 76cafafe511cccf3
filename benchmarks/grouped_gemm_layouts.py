"""Each grouped GEMM of the expert MLP alone (`torch._grouped_mm`), in every operand orientation it
accepts, at the small configs' shapes per micro-batch and layer (32 k tokens routed top-k to 64
experts, bf16): is any forward, input-gradient or weight-gradient GEMM slow because of its layout?

    python benchmarks/grouped_gemm_layouts.py > benchmarks/results/train_mfu/h100_grouped_gemm_layouts.txt

Weights are stored as GroupedExperts stores them, [experts, out, in]. For each GEMM the script
times the orientation the code uses and the other one, and lists the kernels autograd launches
for the layer's backward (torch.profiler). Mean of 20 calls after 3 warm-up calls.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

# (rows in, rows out) of each expert GEMM of configs/small/*.yaml, and (experts, top-k)
LAYERS = {
    "bigmac fc1": (192, 768, 64, 8), "bigmac fc2": (768, 192, 64, 8),
    "fine_grained fc1": (768, 192, 64, 8), "fine_grained fc2": (192, 768, 64, 8),
    "vanilla fc1": (768, 3072, 4, 2), "vanilla fc2": (3072, 768, 4, 2),
}


def mean_ms(fn, calls: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for name, (d_in, d_out, experts, topk) in LAYERS.items():
        picks = torch.randn(args.tokens, experts, device="cuda", generator=generator).topk(topk, -1)
        offs = torch.bincount(picks.indices.view(-1), minlength=experts).cumsum(0).to(torch.int32)
        rows = args.tokens * topk
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, d_in, generator=generator, **bf16)
        g = torch.randn(rows, d_out, generator=generator, **bf16)
        w = torch.randn(experts, d_out, d_in, generator=generator, **bf16) * d_in ** -0.5
        w_in_out = w.transpose(-2, -1).contiguous()  # the other storage, [experts, in, out]
        gmm = lambda a, b: torch._grouped_mm(a, b, offs=offs)
        variants = {
            "forward  x @ W^T, W [E,out,in] (the code)": lambda: gmm(x, w.transpose(-2, -1)),
            "forward  x @ W^T, W [E,in,out]": lambda: gmm(x, w_in_out),
            "dgrad    g @ W,   W [E,out,in] (the code)": lambda: gmm(g, w),
            "dgrad    g @ W,   W [E,in,out]": lambda: gmm(g, w_in_out.transpose(-2, -1)),
            "wgrad    x^T g -> [E,in,out]": lambda: gmm(x.t(), g),
            "wgrad    g^T x -> [E,out,in]": lambda: gmm(g.t(), x),
        }
        flops = 2 * rows * d_in * d_out
        for label, fn in variants.items():
            t = mean_ms(fn)
            print(f"{name:17s} {label:44s} {t:6.3f} ms {flops / t / 1e9:4.0f} TFLOP/s", flush=True)
        x_leaf, w_leaf = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = gmm(x_leaf, w_leaf.transpose(-2, -1))
        for _ in range(2):
            torch.autograd.grad(y, (x_leaf, w_leaf), g, retain_graph=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(y, (x_leaf, w_leaf), g, retain_graph=True)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time > 5]
        print(f"{name:17s} autograd's backward kernels: "
              + ", ".join(f"{e.device_time / 1e3:.3f} ms" for e in kernels), flush=True)


if __name__ == "__main__":
    main()

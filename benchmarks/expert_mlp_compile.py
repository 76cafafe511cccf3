"""The experts' MLP on one GPU, forward + backward, as the code runs it (grouped GEMMs with
`torch._grouped_mm`, eager GELU, compiled gate scaling) against the whole MLP under torch.compile,
default and max-autotune (inductor's Triton grouped-GEMM templates, which could take the GELU and
the gate scaling as epilogues), at the small configs' shapes per micro-batch and layer: 32 k
tokens, top-8, 64 experts, bf16.

    python benchmarks/expert_mlp_compile.py > benchmarks/results/train_mfu/h100_expert_mlp_compile.txt

  bigmac:        rows r*h = 192 wide, hidden h_f = 768
  fine_grained:  rows h = 768 wide, hidden r*h = 192

Mean of 20 calls after 3 warm-up calls (CUDA events); every variant's output and input gradient
are compared with the first's. max-autotune benchmarks its choices first (minutes; its tables
go to stderr).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from megatron_bigmac import kernels
from megatron_bigmac.moe.experts import grouped_linear

SHAPES = {"bigmac": (192, 768), "fine_grained": (768, 192)}  # (row width d, hidden f)


def as_run(x, w1, w2, counts, probs):
    """GroupedExperts.forward's maths: the gate weights scale the narrower side."""
    hidden = grouped_linear(x, w1, counts)
    if w1.shape[1] <= w1.shape[2]:
        scaled = kernels.compiled(kernels.activate_and_scale_rows, dynamic=True)
        return grouped_linear(scaled(hidden, probs, F.gelu), w2, counts)
    scale = kernels.compiled(kernels.scale_rows, dynamic=True)
    return scale(grouped_linear(F.gelu(hidden), w2, counts), probs)


def whole_mlp(x, w1, w2, offsets, probs):
    hidden = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)
    y = torch._grouped_mm(F.gelu(hidden), w2.transpose(-2, -1), offs=offsets)
    return (y * probs.unsqueeze(-1)).to(y.dtype)


def timed(fn, args, grad, calls=20):
    for _ in range(3):
        fn(*args).backward(grad)
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    forward = backward = 0.0
    for _ in range(calls):
        for leaf in args:
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.grad = None
        events[0].record()
        y = fn(*args)
        events[1].record()
        y.backward(grad)
        events[2].record()
        torch.cuda.synchronize()
        forward += events[0].elapsed_time(events[1])
        backward += events[1].elapsed_time(events[2])
    return forward / calls, backward / calls, y


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("structures", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for structure in args.structures:
        d, f = SHAPES[structure]
        rows = args.tokens * args.topk
        picks = torch.randn(args.tokens, args.experts, device="cuda").topk(args.topk, -1).indices
        counts = torch.bincount(picks.view(-1), minlength=args.experts)
        offsets = counts.cumsum(0).to(torch.int32)
        x = (0.5 * torch.randn(rows, d, device="cuda")).bfloat16().requires_grad_()
        w1 = (torch.randn(args.experts, f, d, device="cuda") * d**-0.5).bfloat16().requires_grad_()
        w2 = (torch.randn(args.experts, d, f, device="cuda") * f**-0.5).bfloat16().requires_grad_()
        probs = torch.rand(rows, device="cuda", requires_grad=True)
        grad = torch.randn(rows, d, device="cuda").bfloat16()
        flops = 2 * 2 * rows * d * f  # forward; backward twice that
        reference = None
        for label, fn, group_sizes in (
            ("as run (eager GEMMs)", as_run, counts),
            ("torch.compile", torch.compile(whole_mlp), offsets),
            ("max-autotune", torch.compile(whole_mlp, mode="max-autotune-no-cudagraphs"), offsets),
        ):
            start = time.time()
            forward, backward, y = timed(fn, (x, w1, w2, group_sizes, probs), grad)
            outputs = (y.float(), x.grad.float())
            reference = reference or outputs
            errors = [((a - b).norm() / b.norm()).item() for a, b in zip(outputs, reference)]
            print(f"{structure:13s} {label:21s} forward {forward:6.3f} ms ({flops / forward / 1e9:4.0f}"
                  f" TFLOP/s)  backward {backward:6.3f} ms ({2 * flops / backward / 1e9:4.0f} TFLOP/s)"
                  f"  total {forward + backward:6.3f} ms  rel. diff y {errors[0]:.1e} dx "
                  f"{errors[1]:.1e}  (compile + timing {time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""The MoE permutation's memory-bound kernels on one GPU, eager vs compiled (the dispatcher's
choices in megatron_bigmac/moe/dispatcher.py), at the small config's shape per micro-batch and
layer: 32 k tokens, top-8, rows r*h = 192 wide, bf16.

    python benchmarks/permutation_kernels.py > benchmarks/results/train_mfu/h100_permutation_kernels.txt

  gather:  x[rows_token]                       (permute; the combine's backward)
  combine: y[t] = sum_j z[token_rows[t, j]]    (fp32 sum of each token's k rows)

Mean of 50 calls after 3 warm-up calls (CUDA events); every variant is checked against eager.
"""

from __future__ import annotations

import argparse

import torch

from megatron_bigmac import kernels


def combine_eager(z, token_rows):  # the dispatcher before: a [T*k, d] gathered copy, then a sum
    tokens, topk = token_rows.shape
    rows = z.index_select(0, token_rows.view(-1)).view(tokens, topk, -1)
    return rows.sum(dim=1, dtype=torch.float32).to(z.dtype)


def combine_as_reduction(z, token_rows):  # compiled as a reduction over k
    return z[token_rows].sum(dim=1, dtype=torch.float32).to(z.dtype)


def time_us(fn, *args, calls: int = 50) -> float:
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--width", type=int, default=192)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    t, k, d = args.tokens, args.topk, args.width
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {t} tokens, top-{k}, "
          f"rows {d} wide, bf16")
    z = torch.randn(t * k, d, device="cuda").bfloat16()
    token_rows = torch.randperm(t * k, device="cuda").view(t, k)
    want = combine_eager(z, token_rows)
    for name, fn in (("combine, eager gather + sum", combine_eager),
                     ("combine, compiled reduction", torch.compile(combine_as_reduction, dynamic=True)),
                     ("combine, compiled unrolled (used)", torch.compile(kernels.sum_token_rows, dynamic=True))):
        error = (fn(z, token_rows).float() - want.float()).abs().max().item()
        print(f"{name:36s} {time_us(fn, z, token_rows):8.1f} us   max |diff| vs eager {error:.3g}")
    x = torch.randn(t, d, device="cuda").bfloat16()
    rows_token = torch.randint(0, t, (t * k,), device="cuda")
    want = x.index_select(0, rows_token)
    for name, fn in (("gather, eager index_select", lambda x, i: x.index_select(0, i)),
                     ("gather, compiled (used)", torch.compile(kernels.gather_rows, dynamic=True))):
        same = torch.equal(fn(x, rows_token), want)
        print(f"{name:36s} {time_us(fn, x, rows_token):8.1f} us   equal to eager: {same}")


if __name__ == "__main__":
    main()

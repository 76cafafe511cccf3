"""PyTorch's attention backends at the small configs' attention shape, forward + backward:
[s=1024, b=32, 12 heads, d=64] bf16, causal, with the configs' dropout (0.1) and without, in the
layout SDPAttention hands over (permuted views of megatron-core's [s, b, heads, d] split of the
QKV output) and made contiguous first (the copy not timed).

    python benchmarks/sdpa_backends.py > benchmarks/results/train_mfu/h100_sdpa_backends.txt

Mean of 20 calls after 3 warm-up calls (CUDA events). TFLOP/s count the causal half of the
scores (the model FLOPs of costs.py count all of them, twice this).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from one_gpu import forward_backward_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def timed(q, k, v, dropout_p):
    run = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    forward, backward, _ = forward_backward_ms(run, torch.randn_like(run()))
    return forward, backward


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    s, b, h, d = args.seq, args.batch, args.heads, args.head_dim
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    mixed = torch.randn(s, b, h, 3 * d, device="cuda", dtype=torch.bfloat16)  # QKV output
    flops = 4 * b * h * s * s * d / 2  # forward, causal half; backward 2.5x
    for dropout_p in (0.1, 0.0):
        for contiguous in (False, True):
            for backend in BACKENDS:
                q, k, v = (t.permute(1, 2, 0, 3) for t in mixed.split(d, dim=-1))
                if contiguous:
                    q, k, v = (t.contiguous() for t in (q, k, v))
                q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                label = f"dropout {dropout_p} {'contiguous' if contiguous else 'permuted  '} {backend.name:20s}"
                try:
                    with sdpa_kernel([backend]):
                        forward, backward = timed(q, k, v, dropout_p)
                except RuntimeError as exc:
                    print(f"{label} not available: {str(exc)[:120]}")
                    continue
                print(f"{label} forward {forward:.3f} ms ({flops / forward / 1e9:.0f} TFLOP/s) "
                      f"backward {backward:.3f} ms ({2.5 * flops / backward / 1e9:.0f} TFLOP/s) "
                      f"total {forward + backward:.3f} ms", flush=True)


if __name__ == "__main__":
    main()

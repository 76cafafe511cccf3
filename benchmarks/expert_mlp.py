"""The experts of one MoE layer on one GPU, forward + backward, in the ways the code can run them,
at the small configs' shapes per micro-batch and layer (32 k tokens, bf16):

  torch ops          GroupedExperts without fusions: torch._grouped_mm GEMMs, eager GELU and gate
                     scaling
  as configured      GroupedExperts with moe_activation_fusion (the runner's default): the gate
                     scaling compiled, with the GELU for Fine-Grained, where it scales the hidden
  torch.compile      GroupedExperts without fusions, whole forward under torch.compile
  max-autotune       the same, mode="max-autotune-no-cudagraphs" (inductor's Triton grouped-GEMM
                     templates; minutes of autotuning per structure, only with --autotune)

    python benchmarks/expert_mlp.py > benchmarks/results/train_mfu/h100_expert_mlp.txt

Mean of 20 calls after 3 warm-up calls (benchmarks/one_gpu.py). Each variant's output and
input gradient are compared with the first's (relative norm of the difference).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import megatron_bigmac.config  # noqa: F401  (applies the megatron-core compat shims)
from one_gpu import forward_backward_ms, init_one_rank_model_parallel
from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.moe.experts import GroupedExperts

# (experts, top-k) of configs/small/*.yaml
STRUCTURES = {"bigmac": (64, 8), "fine_grained": (64, 8), "vanilla": (4, 2)}


def experts_module(structure: str, hidden: int, fusion: bool, like=None):
    """GroupedExperts of ``structure`` on the GPU; with ``like``, that module's weights."""
    experts, topk = STRUCTURES[structure]
    config = BigMacConfig(num_layers=1, hidden_size=hidden, num_attention_heads=12,
                          moe_structure=structure, num_moe_experts=experts, moe_router_topk=topk,
                          moe_low_rank_ratio=0.25, bf16=True, params_dtype=torch.bfloat16,
                          moe_activation_fusion=fusion)
    module = GroupedExperts(experts, config).cuda()
    if like is not None:
        module.load_state_dict(like.state_dict())
    return module, config


def routed_rows(structure: str, tokens: int, hidden: int):
    """One layer's expert inputs: ``tokens`` tokens routed top-k by random scores, seeded.
    Returns (reference experts without fusions, counts, gate weights, rows, output gradient)."""
    experts, topk = STRUCTURES[structure]
    rows = tokens * topk
    generator = torch.Generator(device="cuda").manual_seed(0)
    picks = torch.randn(tokens, experts, device="cuda", generator=generator).topk(topk, -1)
    counts = torch.bincount(picks.indices.view(-1), minlength=experts)
    probs = torch.rand(rows, device="cuda", generator=generator)
    reference, config = experts_module(structure, hidden, False)
    d = config.moe_token_width
    x = (0.5 * torch.randn(rows, d, device="cuda", generator=generator)).bfloat16()
    grad = torch.randn(rows, d, device="cuda", generator=generator).bfloat16()
    return reference, counts, probs, x, grad


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("structures", nargs="*", choices=list(STRUCTURES),
                   help="default: all three")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--autotune", action="store_true", help="add the max-autotune row (minutes)")
    args = p.parse_args()
    init_one_rank_model_parallel(port=29534)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    variants = [  # label, moe_activation_fusion, torch.compile mode
        ("torch ops", False, None),
        ("as configured", True, None),
        ("torch.compile", False, "default"),
    ] + ([("max-autotune", False, "max-autotune-no-cudagraphs")] if args.autotune else [])
    for structure in args.structures or list(STRUCTURES):
        first, counts, probs, tokens, grad = routed_rows(structure, args.tokens, args.hidden)
        rows, d = tokens.shape
        reference = None
        for label, fusion, mode in variants:
            # the same weights in every variant
            module, config = experts_module(structure, args.hidden, fusion, like=first)
            f = config.moe_ffn_hidden_size
            x = tokens.clone().requires_grad_()
            forward = module if mode is None else torch.compile(module, mode=mode)
            start = time.time()
            fwd, bwd, y = forward_backward_ms(lambda: forward(x, counts, probs)[0], grad,
                                              leaves=[x, *module.parameters()])
            outputs = (y.float(), x.grad.float())
            reference = reference or outputs
            errors = [((a - b).norm() / b.norm()).item() for a, b in zip(outputs, reference)]
            flops = 2 * 2 * rows * d * f  # forward; backward twice that
            print(f"{structure:13s} {label:18s} forward {fwd:6.3f} ms ({flops / fwd / 1e9:4.0f} "
                  f"TFLOP/s)  backward {bwd:6.3f} ms ({2 * flops / bwd / 1e9:4.0f} TFLOP/s)  total "
                  f"{fwd + bwd:6.3f} ms  rel. diff y {errors[0]:.1e} dx {errors[1]:.1e}  "
                  f"({time.time() - start:.0f} s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One MoE layer, one GPU: forward+backward tokens/s per structure, and the grouped experts'
TFLOP/s (torch._grouped_mm) against a per-expert loop on the same routed tokens.

    python benchmarks/moe_layer.py --out benchmarks/results/moe_layer_h100.json

Defaults are one GPT3-XL MoE layer (h=2048, 64 experts, top-8, r=0.25, 2 x 2048 tokens, bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.distributed as dist

import megatron_bigmac.config  # noqa: F401  (applies the megatron-core compat shims)
from megatron.core.transformer.spec_utils import build_module
from one_gpu import init_one_rank_model_parallel

from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.moe import experts as experts_module
from megatron_bigmac.specs import get_moe_module_spec


def timed_ms(fn, warmup=3, repeat=20):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    init_one_rank_model_parallel(port=29533)
    h, results = args.hidden, {}
    for structure in ("fine_grained", "bigmac", "vanilla"):
        experts, topk = (4, 2) if structure == "vanilla" else (args.experts, args.topk)
        config = BigMacConfig(
            num_layers=1, hidden_size=h, num_attention_heads=16, moe_structure=structure,
            num_moe_experts=experts, moe_router_topk=topk, moe_low_rank_ratio=args.ratio,
            moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=1e-3, bf16=True,
            params_dtype=torch.bfloat16, add_bias_linear=False,
        )
        layer = build_module(get_moe_module_spec(structure), config=config).cuda()
        x = torch.randn(args.tokens, 1, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)

        def layer_step():
            out, _ = layer(x)
            out.backward(grad)

        layer_ms = timed_ms(layer_step)

        # The experts alone, on evenly routed tokens: fwd + bwd = 3 x 2 x (tokens*k) x (2*d*f).
        d, f = config.moe_token_width, config.moe_ffn_hidden_size
        routed = args.tokens * topk
        counts = torch.full((experts,), routed // experts, dtype=torch.long)
        tokens = torch.randn(routed, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        probs = torch.rand(routed, device="cuda", dtype=torch.float32)
        out_grad = torch.randn(routed, d, device="cuda", dtype=torch.bfloat16)
        flops = 3 * 2 * routed * 2 * d * f

        def experts_step():
            out, _ = layer.experts(tokens, counts, probs)
            out.backward(out_grad)

        grouped_ms = timed_ms(experts_step)
        supported = experts_module._grouped_mm_supported
        experts_module._grouped_mm_supported = lambda *a: False  # the per-expert loop fallback
        loop_ms = timed_ms(experts_step)
        experts_module._grouped_mm_supported = supported
        results[structure] = {
            "layer_fwd_bwd_ms": layer_ms,
            "layer_tokens_per_s": args.tokens / (layer_ms / 1e3),
            "experts_grouped_ms": grouped_ms,
            "experts_grouped_tflops": flops / (grouped_ms / 1e3) / 1e12,
            "experts_loop_ms": loop_ms,
            "experts_loop_tflops": flops / (loop_ms / 1e3) / 1e12,
        }
        print(structure, {k: round(v, 2) for k, v in results[structure].items()}, flush=True)
        del layer
    report = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "args": vars(args), "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

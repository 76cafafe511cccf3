"""TopKRouter: megatron-core's router whose fp32 gating GEMM runs on tensor cores without
transformer-engine.

With ``moe_router_dtype: fp32`` megatron-core computes the router logits in fp32. With
transformer-engine that is one GEMM of the bf16 input and weight with an fp32 output; without it
0.16 upcasts both to fp32 copies and runs a CUDA-core fp32 GEMM (measured on one H100, small
BigMac: ~2 ms of fp32 GEMM and ~3 ms of casts per step in the forward). Here the forward is
torch's bf16 x bf16 -> fp32 GEMM (`torch.mm(..., out_dtype=float32)`): the products of bf16
values are exact in fp32 and accumulate in fp32, so the logits are the fp32 ones up to summation
order. The backward is megatron-core's own (fp32, as with transformer-engine).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe import router as mcore_router
from megatron.core.transformer.moe.moe_utils import RouterGatingLinearFunction


class _Bf16InputGatingLinear(RouterGatingLinearFunction):
    """megatron-core's RouterGatingLinearFunction (same saved tensors, same backward) with the
    forward as one tensor-core GEMM with an fp32 output."""

    @staticmethod
    def forward(ctx, inp, weight, bias, router_dtype):
        ctx.save_for_backward(inp, weight, bias)
        ctx.router_dtype = router_dtype
        ctx.input_dtype = inp.dtype
        ctx.weight_dtype = weight.dtype
        output = torch.mm(inp.reshape(-1, inp.size(-1)), weight.t(), out_dtype=router_dtype)
        if bias is not None:
            output = output + bias.to(router_dtype)
        return output.view(*inp.shape[:-1], -1)


class TopKRouter(mcore_router.TopKRouter):
    """megatron-core's TopKRouter; its fp32 gating of a bf16 input on a GPU is one tensor-core
    GEMM (module docstring). Every other case is megatron-core's unchanged."""

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        if (
            input.is_cuda
            and self.config.moe_router_dtype == "fp32"
            and input.dtype in (torch.bfloat16, torch.float16)
            and self.weight.dtype == input.dtype
        ):
            return _Bf16InputGatingLinear.apply(input, self.weight, self.bias, torch.float32)
        return super().gating(input)

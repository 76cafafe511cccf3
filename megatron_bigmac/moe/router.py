"""TopKRouter: megatron-core's router with its fp32 gating GEMMs on tensor cores and one top-k
per layer instead of two, without transformer-engine.

Gating. With ``moe_router_dtype: fp32`` megatron-core computes the router logits in fp32. With
transformer-engine that is one GEMM of the bf16 input and weight with an fp32 output; without it
0.16 upcasts both to fp32 copies and runs CUDA-core fp32 GEMMs, forward and backward (measured
on one H100, small BigMac: ~5 ms of fp32 GEMMs and ~3 ms of casts per step). Here:
- forward: torch's bf16 x bf16 -> fp32 GEMM (`torch.mm(..., out_dtype=float32)`). Products of
  bf16 values are exact in fp32 and accumulate in fp32: the fp32 logits up to summation order.
- backward: the fp32 output gradient g is split into bf16 halves, g = hi + lo with
  hi = bf16(g), lo = bf16(g - hi) (16 of fp32's 24 mantissa bits, relative error <= 2^-16), and
  each fp32 GEMM becomes one bf16 tensor-core GEMM with fp32 accumulation over [hi | lo]:
      dx = [hi | lo] @ [W ; W]          (K = 2E; rounded once, to x's dtype, as megatron's)
      dW = [hi | lo]^T @ x  ->  rows 0..E-1 + rows E..2E-1   (fp32, as megatron's)
  x and W are bf16, hence exact operands: only g's last 8 bits are lost, where TF32 would lose 13.

Top-k. megatron-core 0.16 selects each token's experts twice: once for dispatch (top-k of the
logits) and again, on the softmax of the logits, for the auxiliary load-balancing loss
(`compute_routing_scores_for_aux_loss`). Softmax is monotonic, so with a softmax score function,
no expert bias, no group-limited routing and no replay both selections are the same experts
(exact ties aside): the aux losses here reuse the dispatch routing map (before any token
dropping, as megatron-core's are) and skip the second top-k, its scatter and casts. Every other
configuration is megatron-core's routing unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe import router as mcore_router
from megatron.core.transformer.moe.moe_utils import (
    RouterGatingLinearFunction,
    apply_router_token_dropping,
    topk_routing_with_score_function,
)


def _split_bf16(grad: torch.Tensor) -> torch.Tensor:
    """[hi | lo] along the last dimension: two bf16 tensors whose sum is ``grad`` (fp32) to
    16 mantissa bits."""
    hi = grad.to(torch.bfloat16)
    lo = (grad - hi.float()).to(torch.bfloat16)
    return torch.cat([hi, lo], dim=-1)


class _Bf16InputGatingLinear(RouterGatingLinearFunction):
    """megatron-core's RouterGatingLinearFunction (same inputs, same saved tensors) with the
    forward and backward GEMMs on tensor cores (module docstring)."""

    @staticmethod
    def forward(ctx, inp, weight, bias, router_dtype):
        ctx.save_for_backward(inp, weight, bias)
        ctx.router_dtype = router_dtype
        output = torch.mm(inp.reshape(-1, inp.size(-1)), weight.t(), out_dtype=router_dtype)
        if bias is not None:
            output = output + bias.to(router_dtype)
        return output.view(*inp.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        inp, weight, bias = ctx.saved_tensors
        x = inp.reshape(-1, inp.size(-1))
        grad = grad_output.reshape(-1, grad_output.size(-1)).float()
        num_experts = grad.size(-1)
        hi_lo = _split_bf16(grad)  # [T, 2E] bf16
        grad_input = torch.mm(hi_lo, torch.cat([weight, weight])).view(inp.shape)
        grad_weight = torch.mm(hi_lo.t(), x, out_dtype=torch.float32)
        grad_weight = (grad_weight[:num_experts] + grad_weight[num_experts:]).to(weight.dtype)
        grad_bias = grad.sum(dim=0).to(bias.dtype) if bias is not None else None
        return grad_input, grad_weight, grad_bias, None


class TopKRouter(mcore_router.TopKRouter):
    """megatron-core's TopKRouter; its fp32 gating of bf16 inputs on a GPU runs on tensor cores,
    and its aux losses reuse the dispatch top-k where that is the same selection (module
    docstring). Every other case is megatron-core's unchanged."""

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        if (
            input.is_cuda
            and self.config.moe_router_dtype == "fp32"
            and input.dtype == torch.bfloat16  # the backward splits into bf16 halves
            and self.weight.dtype == input.dtype
        ):
            return _Bf16InputGatingLinear.apply(input, self.weight, self.bias, torch.float32)
        return super().gating(input)

    def _dispatch_topk_serves_aux_loss(self, padding_mask: Optional[torch.Tensor]) -> bool:
        config = self.config
        return (
            self.routing_type != "sinkhorn"
            and self.score_function == "softmax"
            and self.expert_bias is None
            and not config.moe_router_group_topk
            and self.router_replay is None
            and not config.moe_router_fusion
            and padding_mask is None
        )

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if not self._dispatch_topk_serves_aux_loss(padding_mask):
            return super().routing(logits, padding_mask=padding_mask)
        # megatron-core 0.16's TopKRouter.routing, with the aux losses' top-k taken from dispatch.
        config = self.config
        seq_length, bsz = logits.shape[:2]
        logits = self.apply_z_loss(logits.view(-1, config.num_moe_experts))
        probs, routing_map = topk_routing_with_score_function(
            logits,
            self.topk,
            use_pre_softmax=config.moe_router_pre_softmax,
            scaling_factor=config.moe_router_topk_scaling_factor,
            score_function=self.score_function,
        )
        routing_map_for_aux_loss = routing_map
        if config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                router_topk=self.topk,
                capacity_factor=config.moe_expert_capacity_factor,
                drop_policy=config.moe_token_drop_policy,
                pad_to_capacity=config.moe_pad_expert_input_to_capacity,
            )
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            probs = self._apply_aux_loss(probs, scores, routing_map_for_aux_loss)
            probs = self._apply_seq_aux_loss(probs, scores, routing_map_for_aux_loss,
                                             seq_length, bsz)
            probs = self._apply_global_aux_loss(probs, scores, routing_map_for_aux_loss)
        return probs, routing_map

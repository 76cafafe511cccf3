"""LeanTopKRouter: megatron-core's TopKRouter with one softmax and one top-k per layer.

megatron-core 0.16 without transformer-engine routes a token with softmax scores and an
auxiliary load-balancing loss in two passes over the [T, E] logits: top-k of the logits, a
softmax over the k picks and two scatters into [T, E] probabilities and map; then, for the aux
loss, a softmax over all E logits, a second top-k (the same experts: softmax keeps the order)
and a third scatter. Each top-k of a [32 k, 64] matrix is a radix select on GPUs, about 0.1 ms
on an H100, and the project's dispatcher used to pay for a third one. Measured on an H100 (small
BigMac config), the router was 11% of a training step's GPU time.

The same maths in one pass:

    scores = softmax(logits)                     fp32, over all E experts (the aux loss's input)
    top, experts = top-k of scores               one selection; softmax preserves the ranking
    probs  = top / sum(top)                      = softmax over the k picked logits (megatron-
                                                   core's default); `top` itself with pre-softmax
    probs, routing_map scattered to [T, E]       the interface the dispatchers take
    aux loss from (scores, routing_map)          megatron-core's own `_apply_aux_loss`

The results equal megatron-core's to fp32 rounding (tests/test_router.py). Configurations this
does not cover (sigmoid scores, expert groups, expert bias, token dropping, router replay,
transformer-engine fusion, padding masks, sequence/global aux losses, deterministic mode) take
megatron-core's `routing` unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter


class LeanTopKRouter(TopKRouter):
    """TopKRouter (same constructor, parameters and checkpoint layout) whose routing takes one
    softmax and one top-k where the configuration allows (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.lean = (
            c.moe_router_single_pass
            and self.routing_type in ("aux_loss", "none")
            and self.score_function == "softmax"
            and not c.moe_router_num_groups
            and self.expert_bias is None
            and c.moe_expert_capacity_factor is None
            and not c.moe_router_fusion
            and self.router_replay is None
        )

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if not self.lean or padding_mask is not None or torch.are_deterministic_algorithms_enabled():
            return super().routing(logits, padding_mask=padding_mask)
        logits = logits.view(-1, self.config.num_moe_experts)
        logits = self.apply_z_loss(logits)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, experts = torch.topk(scores, self.topk, dim=1)
        if not self.config.moe_router_pre_softmax:
            top = top / top.sum(dim=-1, keepdim=True)
        if self.config.moe_router_topk_scaling_factor:
            top = top * self.config.moe_router_topk_scaling_factor
        probs = torch.zeros_like(logits).scatter(1, experts, top.type_as(logits))
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, experts, True)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            probs = self._apply_aux_loss(probs, scores, routing_map)
        return probs, routing_map

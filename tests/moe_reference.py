"""The paper's MoE equations in plain PyTorch: no megatron-core, one loop over experts.

    logits = x W_r^T                                   router on the full-width x
    G, S   = top-k of logits, softmax over the kept k  (megatron-core's default normalisation;
                                                        the paper leaves it open)
    x'     = x W_down^T            (BigMac only)        h -> r*h
    y'     = sum_{i in S(x)} G_i(x) * act(x' W1_i^T) W2_i^T
    y      = y' W_up^T             (BigMac only)        r*h -> h

Token dropping (capacity factor c): each expert keeps at most ceil(T * k / E * c) of the tokens
routed to it, those with the highest gate, and a dropped token's gate is zeroed (not renormalised).
Load balancing (Switch / megatron "aux_loss"): coeff * E / (k * T^2) * sum_e P_e * n_e, with P_e the
summed full-softmax scores of expert e and n_e the number of tokens that chose e before dropping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    if name == "squared_relu":
        return F.relu(x) ** 2
    if name == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(name)


@dataclass
class MoEWeights:
    router: torch.Tensor  # [E, h]
    w1: torch.Tensor  # [E, G*f, d]
    w2: torch.Tensor  # [E, d, f]
    w_down: Optional[torch.Tensor] = None  # [r*h, h]
    w_up: Optional[torch.Tensor] = None  # [h, r*h]

    def tensors(self):
        return [t for t in (self.router, self.w1, self.w2, self.w_down, self.w_up) if t is not None]


def route(logits: torch.Tensor, topk: int, capacity_factor: Optional[float] = None):
    """Return (gates [T, E], chosen-before-dropping [T, E] bool)."""
    num_tokens, num_experts = logits.shape
    top_logits, top_experts = logits.topk(topk, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, top_experts, top_logits.softmax(dim=-1))
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_experts, True)
    kept = chosen.clone()
    if capacity_factor is not None:
        capacity = math.ceil(num_tokens * topk / num_experts * capacity_factor)
        for e in range(num_experts):
            tokens = chosen[:, e].nonzero().squeeze(1)
            if len(tokens) > capacity:
                keep = tokens[gates.detach()[tokens, e].topk(capacity).indices]
                kept[:, e] = False
                kept[keep, e] = True
        gates = gates * kept
    return gates, chosen


def aux_loss(logits, chosen_counts, total_tokens, topk, coeff):
    """This rank's share of the load-balancing loss; counts/total are over the reduce domain."""
    num_experts = logits.shape[1]
    scores = logits.softmax(dim=-1)
    return coeff * num_experts / (topk * total_tokens**2) * (scores.sum(0) * chosen_counts).sum()


def moe_forward(
    x: torch.Tensor,
    w: MoEWeights,
    topk: int,
    activation: str = "gelu",
    capacity_factor: Optional[float] = None,
):
    """x: [T, h] -> (y [T, h], logits, chosen)."""
    logits = x @ w.router.t()
    gates, chosen = route(logits, topk, capacity_factor)
    tokens = x @ w.w_down.t() if w.w_down is not None else x
    y = torch.zeros_like(tokens)
    for e in range(w.router.shape[0]):
        idx = gates[:, e].nonzero().squeeze(1)
        expert_out = act(activation, tokens[idx] @ w.w1[e].t()) @ w.w2[e].t()
        y = y.index_add(0, idx, gates[idx, e, None] * expert_out)
    if w.w_up is not None:
        y = y @ w.w_up.t()
    return y, logits, chosen

"""GatherAlltoAllTokenDispatcher: megatron-core's All-to-All dispatcher with a permutation that
never waits for the host and never adds with atomics.

The token dispatcher moves tokens at whatever width it is given: r*h for BigMac (the layer
descends before dispatch), h for Fine-Grained and Vanilla. megatron-core 0.16's All-to-All
dispatcher without transformer-engine permutes with `masked_select` (a host-device sync each,
twice per layer), un-permutes with `scatter_add` (bf16 atomics; its backward, `index_add`, is the
same), and on one rank still sorts token chunks by local expert, an identity that costs a host
sync, a split and a cat each way. Measured on one H100 (small BigMac config): those pieces were
about 15% of the GPU time of a training step.

In dropless routing every token goes to exactly top-k experts, so the permutation is a plan of
fixed size, built on the device from the top-k expert ids:

    pair (token t, its j-th expert e)  goes to row  start[e] + (tokens before t routed to e)
                                       start = exclusive cumsum of tokens per expert, the
                                       second term a cumsum down the routing map: expert-major,
                                       tokens ascending within an expert, which is megatron-
                                       core's own order (so results are the same), no sort
    permute:    out[row(t, j)] = x[t]  a gather (one compiled kernel); backward sums each
                                       token's k rows
    unpermute:  y[t] = sum_j z[row(t, j)]  a sum over k (fp32 accumulation) of rows read in
                                       place (one compiled kernel); backward is a gather

With one rank in the expert group (no EP, no expert TP) the tokens after permutation are already
grouped by expert: nothing is sorted and `tokens_per_expert` stays on the device (GroupedExperts
takes device counts), so a dropless step has no host sync in its MoE layers. With EP > 1 the
All-to-All needs its split sizes on the host: megatron-core's single device-to-host copy before
the All-to-All is kept. Token dropping (a capacity factor) and transformer-engine's fused
permutation take megatron-core's path unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_bigmac.kernels import compiled, gather_rows, sum_token_rows


class _PermutationPlan:
    """Where each (token, expert) pair goes: ``token_rows`` [T, k], the permuted rows of each
    token's k experts (``expert_ids`` [T, k]); ``rows_token`` [T * k], the token of each row."""

    def __init__(self, routing_map: torch.Tensor, tokens_per_expert: torch.Tensor, topk: int):
        num_tokens = routing_map.size(0)
        # The k experts of each token, its True entries (exactly k in dropless routing), in
        # ascending order, which makes the combine's summation order deterministic. A fixed-size
        # nonzero: no host sync, and a stream compaction where a top-k would be a radix select.
        self.expert_ids = torch.nonzero_static(routing_map, size=num_tokens * topk)[:, 1]
        self.expert_ids = self.expert_ids.view(num_tokens, topk)
        # Row of (t, e): where expert e's block starts + how many earlier tokens chose e. The
        # running count is a scan along each expert's row of the [E, T] map (a scan down the
        # [T, E] map's short columns is a slow kernel on GPUs).
        start = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        earlier = torch.cumsum(routing_map.T.contiguous(), dim=1, dtype=torch.int64).view(-1)
        tokens = torch.arange(num_tokens, device=routing_map.device)
        pair = self.expert_ids * num_tokens + tokens.unsqueeze(1)  # flat index into [E, T]
        self.token_rows = start[self.expert_ids] + earlier[pair] - 1
        self.rows_token = torch.empty(num_tokens * topk, dtype=torch.int64,
                                      device=routing_map.device)
        self.rows_token[self.token_rows.view(-1)] = tokens.repeat_interleave(topk)


class _GatherRows(torch.autograd.Function):
    """out = x[rows_token]: each token copied to its k rows. Backward: the sum of each token's
    k row gradients (a gather, no atomics)."""

    @staticmethod
    def forward(ctx, x, plan: _PermutationPlan):
        ctx.plan = plan
        return _gather_rows(x, plan.rows_token)

    @staticmethod
    def backward(ctx, grad):
        return _sum_token_rows(grad, ctx.plan), None


class _SumTokenRows(torch.autograd.Function):
    """y[t] = sum over the k rows of token t of z. Backward: each row gets its token's
    gradient (a gather)."""

    @staticmethod
    def forward(ctx, z, plan: _PermutationPlan):
        ctx.plan = plan
        return _sum_token_rows(z, plan)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.plan.rows_token), None


# One kernel each on GPUs; symbolic sizes, as row counts vary under expert parallelism.
def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return compiled(gather_rows, dynamic=True)(x, index)


def _sum_token_rows(z: torch.Tensor, plan: _PermutationPlan) -> torch.Tensor:
    return compiled(sum_token_rows, dynamic=True)(z, plan.token_rows)


class GatherAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron-core's MoEAlltoAllTokenDispatcher (same constructor, same interface) with the
    device-side permutation described in the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        # The cases the plan covers: dropless, no fused (TE) permutation, no quantization
        # padding, no shared experts overlapped inside the dispatcher.
        self.gather_permute = (
            config.moe_expert_capacity_factor is None
            and not config.moe_permute_fusion
            and not config.moe_router_padding_for_quantization
        )
        # One rank holds every expert: permutation 1 already groups tokens by expert.
        self.single_rank = self.ep_size * self.tp_size == 1 and self.gather_permute
        self._plan = None

    def _use_plan(self) -> bool:
        return self.gather_permute and self.shared_experts is None

    # ------------------------------------------------------------------ dispatch
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        if not self._use_plan():
            return super().dispatch_preprocess(hidden_states, routing_map, probs)
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.hidden_shape_before_permute = hidden_states.shape
        # Split sizes for the All-to-All (device tensors; copied to the host only with EP/TP).
        num_local_tokens_per_expert = routing_map.sum(dim=0)
        self.tokens_per_expert = self.preprocess(routing_map)
        self._plan = plan = _PermutationPlan(routing_map, num_local_tokens_per_expert,
                                             self.config.moe_router_topk)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_permutation_1", self.tokens_per_expert
        )
        permuted_probs = probs.new_empty(plan.rows_token.shape)
        permuted_probs[plan.token_rows.view(-1)] = probs.gather(1, plan.expert_ids).view(-1)
        return _GatherRows.apply(hidden_states, plan), permuted_probs

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        if not (self.single_rank and self._use_plan()):
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        # Already grouped by expert; the counts stay on the device.
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return global_input_tokens, tokens_per_expert, global_probs

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if self.single_rank and self._use_plan():
            return tokens_per_expert  # nothing needs host values on one rank
        return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)

    # ------------------------------------------------------------------ combine
    def combine_preprocess(self, hidden_states):
        if self.single_rank and self._use_plan():
            return hidden_states
        return super().combine_preprocess(hidden_states)

    def combine_postprocess(self, permutated_local_input_tokens):
        if not self._use_plan():
            return super().combine_postprocess(permutated_local_input_tokens)
        output = _SumTokenRows.apply(permutated_local_input_tokens, self._plan)
        self._plan = None
        return output.view(self.hidden_shape)

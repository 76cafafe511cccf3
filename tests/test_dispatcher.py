"""GatherAlltoAllTokenDispatcher against megatron-core's MoEAlltoAllTokenDispatcher: the same
permuted tokens, probabilities and counts, the same combined output and gradients; on one rank no
chunk sort and no device-to-host copy; with EP=2 the same results over gloo."""

import torch
from distributed import run_distributed
from megatron.core import parallel_state as ps
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import token_dispatcher as mcore_dispatcher
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

import megatron_bigmac  # noqa: F401  (compat shims)
from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.moe.dispatcher import GatherAlltoAllTokenDispatcher

NUM_EXPERTS, TOPK, TOKENS, WIDTH = 8, 3, 40, 16


def _config(ep: int, **overrides) -> BigMacConfig:
    kwargs = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=NUM_EXPERTS,
                  moe_router_topk=TOPK, expert_model_parallel_size=ep, use_cpu_initialization=True,
                  moe_token_dispatcher_type="alltoall", moe_structure="fine_grained")
    kwargs.update(overrides)
    return BigMacConfig(**kwargs)


def _routing(seed: int, rank: int):
    """Skewed top-k routing (some experts get far more tokens than others) with its probs."""
    g = torch.Generator().manual_seed(seed + rank)
    logits = torch.randn(TOKENS, NUM_EXPERTS, generator=g) + torch.linspace(0, 3, NUM_EXPERTS)
    top = torch.topk(logits, TOPK, dim=1).indices
    routing_map = torch.zeros(TOKENS, NUM_EXPERTS, dtype=torch.bool).scatter_(1, top, True)
    probs = torch.softmax(logits, dim=1) * routing_map
    tokens = torch.randn(TOKENS, WIDTH, generator=g)
    return tokens, routing_map, probs


def _round_trip(dispatcher, tokens, routing_map, probs, expert_weight):
    """dispatch -> a per-expert linear map scaled by probs -> combine; returns the output, the
    tensors the experts saw, and the gradients of tokens and probs."""
    tokens = tokens.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    x, p = dispatcher.dispatch_preprocess(tokens, routing_map, probs)
    x, p = dispatcher.token_dispatch(x, p)
    x, counts, p = dispatcher.dispatch_postprocess(x, p)
    expert = torch.repeat_interleave(torch.arange(len(counts)), counts.to(torch.long).cpu())
    y = torch.einsum("nd,nde->ne", x, expert_weight[expert]) * p.unsqueeze(-1)
    y = dispatcher.combine_preprocess(y)
    y = dispatcher.token_combine(y)
    out = dispatcher.combine_postprocess(y)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    return out.detach(), x.detach(), p.detach(), counts.cpu(), tokens.grad, probs.grad


def compare_with_megatron(rank, world, check_no_sync):
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    config = _config(world)
    local = NUM_EXPERTS // world
    indices = list(range(rank * local, (rank + 1) * local))
    torch.manual_seed(0)
    weight = torch.randn(local, WIDTH, WIDTH)
    tokens, routing_map, probs = _routing(1, rank)

    ours = GatherAlltoAllTokenDispatcher(local, indices, config=config, pg_collection=pg)
    stock = MoEAlltoAllTokenDispatcher(local, indices, config=config, pg_collection=pg)
    expected = _round_trip(stock, tokens, routing_map, probs, weight)

    if check_no_sync:
        # One rank: tokens are already grouped by expert and nothing needs host values.
        def refuse(*args, **kwargs):
            raise AssertionError("host copy or chunk sort on one rank")

        mcore_dispatcher.sort_chunks_by_idxs = refuse
        mcore_dispatcher.maybe_move_tensor_to_cpu = refuse
        torch.Tensor.masked_select = refuse
    got = _round_trip(ours, tokens, routing_map, probs, weight)
    for name, a, b in zip(("output", "expert input", "expert probs", "counts", "token grad",
                           "probs grad"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_one_rank_matches_megatron_without_host_sync():
    run_distributed(compare_with_megatron, 1, True)


def test_ep2_matches_megatron():
    run_distributed(compare_with_megatron, 2, False)


def stock_path_with_capacity(rank, world):
    """A capacity factor drops tokens: the dispatcher takes megatron-core's path unchanged."""
    ps.initialize_model_parallel()
    pg = ProcessGroupCollection.use_mpu_process_groups()
    config = _config(1, moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    dispatcher = GatherAlltoAllTokenDispatcher(NUM_EXPERTS, list(range(NUM_EXPERTS)),
                                               config=config, pg_collection=pg)
    assert not dispatcher.gather_permute and not dispatcher.single_rank


def test_capacity_factor_takes_megatron_path():
    run_distributed(stock_path_with_capacity, 1)


def test_permutation_plan_order_is_expert_major_tokens_ascending():
    from megatron_bigmac.moe.dispatcher import _PermutationPlan

    _, routing_map, _ = _routing(7, 0)
    plan = _PermutationPlan(routing_map, routing_map.sum(0), TOPK)
    expected = torch.arange(TOKENS).unsqueeze(0).expand(NUM_EXPERTS, -1)[routing_map.T]
    assert torch.equal(plan.rows_token, expected)
    # token_rows inverts rows_token: every token's k rows hold that token.
    assert torch.equal(plan.rows_token[plan.token_rows], torch.arange(TOKENS).unsqueeze(1).expand(-1, TOPK))

"""LeanTopKRouter against megatron-core's TopKRouter given the same weights and tokens: the same
routing map, probabilities, load-balancing loss and gradients (input and router weight) for
every configuration it covers; the configurations it does not cover take megatron-core's path."""

import pytest
import torch
from distributed import run_distributed
from megatron.core import parallel_state as ps
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
from megatron.core.transformer.moe.router import TopKRouter

import megatron_bigmac  # noqa: F401  (compat shims)
from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.moe.router import LeanTopKRouter

HIDDEN, EXPERTS, SEQ, BATCH = 32, 16, 12, 3

CASES = {
    "softmax after top-k (default)": dict(moe_router_topk=4),
    "pre-softmax, scaled": dict(moe_router_topk=4, moe_router_pre_softmax=True,
                                moe_router_topk_scaling_factor=2.5),
    "top-1, z-loss": dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_z_loss_coeff=1e-2),
    "no aux loss": dict(moe_router_topk=4, moe_router_load_balancing_type="none",
                        moe_aux_loss_coeff=0.0),
    "bf16 logits": dict(moe_router_topk=4, moe_router_dtype=None),
}


def _config(**overrides) -> BigMacConfig:
    kwargs = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4,
                  num_moe_experts=EXPERTS, moe_structure="fine_grained", moe_aux_loss_coeff=1e-2,
                  moe_router_load_balancing_type="aux_loss", moe_router_dtype="fp32",
                  use_cpu_initialization=True, init_method_std=0.5)
    kwargs.update(overrides)
    return BigMacConfig(**kwargs)


def _route(router_class, config, pg, tokens):
    """forward + backward of one router; returns probs, map, aux loss, input and weight grads."""
    torch.manual_seed(7)
    router = router_class(config=config, pg_collection=pg)
    router.set_layer_number(1)
    router.train()
    moe_utils.clear_aux_losses_tracker()
    x = tokens.clone().requires_grad_(True)
    probs, routing_map = router(x)
    # A loss that weighs each (token, expert) probability differently, plus the aux loss the
    # probabilities carry (megatron-core attaches it to their backward).
    weights = torch.arange(probs.numel(), dtype=probs.dtype).view_as(probs).cos()
    (probs * weights).sum().backward()
    tracker = get_moe_layer_wise_logging_tracker()
    aux = {name: entry["values"].clone() for name, entry in tracker.items()}
    return probs.detach().float(), routing_map, aux, x.grad.float(), router.weight.grad.float()


def _compare(rank, world, case):
    ps.initialize_model_parallel()
    pg = ProcessGroupCollection.use_mpu_process_groups()
    config = _config(**CASES[case])
    torch.manual_seed(0)
    tokens = torch.randn(SEQ, BATCH, HIDDEN)
    if config.moe_router_dtype is None:
        tokens = tokens.bfloat16()
    lean = LeanTopKRouter(config=config, pg_collection=pg)
    assert lean.lean, f"{case}: expected the lean path"
    got = _route(LeanTopKRouter, config, pg, tokens)
    expected = _route(TopKRouter, config, pg, tokens)
    tol = dict(rtol=2e-2, atol=2e-3) if config.moe_router_dtype is None else dict(rtol=1e-5,
                                                                                   atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], msg=f"{case}: routing map")
    assert int(got[1].sum()) == SEQ * BATCH * config.moe_router_topk
    torch.testing.assert_close(got[0], expected[0], **tol, msg=f"{case}: probs")
    assert got[2].keys() == expected[2].keys()
    for name in got[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], **tol, msg=f"{case}: {name}")
    torch.testing.assert_close(got[3], expected[3], **tol, msg=f"{case}: input grad")
    torch.testing.assert_close(got[4], expected[4], **tol, msg=f"{case}: weight grad")


@pytest.mark.parametrize("case", list(CASES))
def test_lean_router_matches_megatron_core(case):
    run_distributed(_compare, 1, case)


def _fallbacks(rank, world):
    ps.initialize_model_parallel()
    pg = ProcessGroupCollection.use_mpu_process_groups()
    uncovered = {
        "sigmoid scores": dict(moe_router_score_function="sigmoid"),
        "expert groups": dict(moe_router_num_groups=4, moe_router_group_topk=2),
        "token dropping": dict(moe_expert_capacity_factor=1.0),
        "sequence aux loss": dict(moe_router_load_balancing_type="seq_aux_loss"),
        "switched off": dict(moe_router_single_pass=False),
    }
    for name, overrides in uncovered.items():
        config = _config(moe_router_topk=4, **overrides)
        router = LeanTopKRouter(config=config, pg_collection=pg)
        assert not router.lean, name
        torch.manual_seed(0)
        tokens = torch.randn(SEQ, BATCH, HIDDEN)
        got = _route(LeanTopKRouter, config, pg, tokens)
        expected = _route(TopKRouter, config, pg, tokens)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_uncovered_configurations_take_megatron_cores_routing():
    run_distributed(_fallbacks, 1)

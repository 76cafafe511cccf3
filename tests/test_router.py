"""megatron_bigmac.moe.TopKRouter against megatron-core's TopKRouter: the same routing, the same
auxiliary-loss gradients with one top-k per layer (CPU, every aux-loss type, with and without
token dropping, and a configuration that must fall back), and on a GPU the tensor-core fp32
gating (forward and the split-bf16 backward) against megatron-core's fp32 GEMMs."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

import megatron_bigmac  # noqa: F401  (compat shims)
from megatron_bigmac.config import BigMacConfig

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True)

ROUTING_CASES = {
    "aux_loss": dict(moe_router_load_balancing_type="aux_loss"),
    "aux_loss_pre_softmax": dict(moe_router_load_balancing_type="aux_loss",
                                 moe_router_pre_softmax=True),
    "seq_aux_loss_dropping": dict(moe_router_load_balancing_type="seq_aux_loss",
                                  moe_expert_capacity_factor=1.0),
    "global_aux_loss": dict(moe_router_load_balancing_type="global_aux_loss"),
    # Not the same selection (top-k of sigmoid + bias): megatron-core's routing, unchanged.
    "sigmoid_expert_bias": dict(moe_router_load_balancing_type="aux_loss",
                                moe_router_score_function="sigmoid",
                                moe_router_enable_expert_bias=True),
}


def compare_routing(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter as MegatronTopKRouter

    from megatron_bigmac.moe import TopKRouter

    ps.initialize_model_parallel()
    groups = get_default_pg_collection()
    for name, overrides in ROUTING_CASES.items():
        config = BigMacConfig(**TINY, num_moe_experts=16, moe_router_topk=4,
                              moe_aux_loss_coeff=0.5, **overrides)
        routers = [cls(config=config, pg_collection=groups) for cls in
                   (MegatronTopKRouter, TopKRouter)]
        expects_fallback = name == "sigmoid_expert_bias"
        assert routers[1]._dispatch_topk_serves_aux_loss(None) != expects_fallback, name
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(32, 3, 16, generator=generator)
        weights = torch.randn(96, 16, generator=generator)
        results = []
        for router in routers:
            router.train()
            outputs = []
            # Upstream gradient zero: the logits' gradient is the aux losses' alone; then both.
            for upstream in (torch.zeros_like(weights), weights):
                leaf = logits.clone().requires_grad_(True)
                probs, routing_map = router.routing(leaf)
                (probs * upstream).sum().backward()
                outputs += [probs, routing_map, leaf.grad]
            results.append(outputs)
        aux_grad = results[1][2]
        assert aux_grad.abs().sum() > 0, name  # the aux loss reached the logits
        for i, (got, want) in enumerate(zip(results[1], results[0])):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{name} output {i}")
    ps.destroy_model_parallel()


def test_router_reuses_the_dispatch_topk_for_aux_losses_with_the_same_results():
    run_distributed(compare_routing, 1)


def test_bf16_split_keeps_fp32_gradients_to_16_bits():
    from megatron_bigmac.moe.router import _split_bf16

    grad = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)) * 1e-3
    grad[0, :4] = torch.tensor([1e-30, -3e20, 0.0, 1.0 + 2.0 ** -20])
    hi_lo = _split_bf16(grad)
    assert hi_lo.dtype == torch.bfloat16 and hi_lo.shape == (4096, 128)
    hi, lo = hi_lo.float().chunk(2, dim=-1)
    assert torch.equal(hi, grad.bfloat16().float())
    error = ((hi + lo) - grad).abs()
    assert (error <= grad.abs() * 2.0 ** -16).all()
    assert (error > 0).any()  # not exact: 16 of fp32's 24 bits (bf16 alone keeps 8)
    assert ((hi - grad).abs() > grad.abs() * 2.0 ** -16).any()


def compare_router_gating(rank, world, device="cuda"):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter as MegatronTopKRouter

    from megatron_bigmac.moe import TopKRouter

    ps.initialize_model_parallel()
    groups = get_default_pg_collection()
    config = BigMacConfig(**{**TINY, "hidden_size": 768, "num_attention_heads": 12},
                          num_moe_experts=64, moe_router_topk=8,
                          moe_router_dtype="fp32", params_dtype=torch.bfloat16)
    routers = [cls(config=config, pg_collection=groups).to(device).bfloat16()
               for cls in (MegatronTopKRouter, TopKRouter)]
    routers[1].load_state_dict(routers[0].state_dict())
    assert routers[0].bias is not None  # add_bias_linear, megatron-core's default
    x = torch.randn(1024, 2, 768, device=device).bfloat16()
    grad = torch.randn(1024, 2, 64, device=device)
    results = []
    for router in routers:
        leaf = x.clone().requires_grad_(True)
        logits = router.gating(leaf)
        logits.backward(grad)
        results.append((logits, leaf.grad, router.weight.grad, router.bias.grad))
    (want, want_dx, want_dw, want_db), (got, got_dx, got_dw, got_db) = results
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 up to summation order
    # dx: both round an fp32-accumulated result to bf16 once; a few elements may round apart.
    assert got_dx.dtype == want_dx.dtype == torch.bfloat16
    torch.testing.assert_close(got_dx, want_dx)
    # dW: fp32 sums over 2048 tokens (g kept to 2^-16 by the split), rounded to the bf16
    # parameters' dtype; the two differ by one bf16 step where the fp32 sums round apart
    # (0.3% of the elements on an H100). Without the lo half (g in bf16) most elements would.
    assert got_dw.dtype == want_dw.dtype == torch.bfloat16
    assert (got_dw.float() - want_dw.float()).norm() / want_dw.float().norm() < 1e-3
    torch.testing.assert_close(got_db, want_db)  # the same fp32 sum
    ps.destroy_model_parallel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core gating is GPU-only")
def test_router_gating_matches_megatron_fp32_gating_on_gpu():
    run_distributed(compare_router_gating, 1, backend="nccl")

"""The megatron-core MoE layers (BigMac, Fine-Grained, Vanilla) against the paper's equations.

Every case builds the layer under a parallel layout (spawned gloo processes on CPU, or one GPU),
feeds each rank its own tokens, runs forward + backward (output gradient + load-balancing loss),
and checks on every rank: the output, the input gradient, and every parameter's gradient against
tests/moe_reference.py, an independent plain-PyTorch implementation given the same weights.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from moe_reference import MoEWeights, aux_loss, moe_forward, route

H, SEQ, BATCH = 32, 8, 2
AUX_COEFF = 1e-2
EXPERTS = {"bigmac": (8, 2), "fine_grained": (8, 2), "vanilla": (4, 2)}  # (experts, top-k)
STRUCTURES = tuple(EXPERTS)


def build_layer(structure, tp=1, ep=1, etp=1, dispatcher="alltoall", capacity=None,
                activation="gelu", dtype=torch.float32, device="cpu"):
    import megatron_bigmac.config  # noqa: F401  (applies the megatron-core compat shims)
    from megatron.core.transformer.spec_utils import build_module

    from megatron_bigmac.config import BigMacConfig
    from megatron_bigmac.specs import get_moe_module_spec

    experts, topk = EXPERTS[structure]
    config = BigMacConfig(
        num_layers=1, hidden_size=H, num_attention_heads=4, moe_structure=structure,
        num_moe_experts=experts, moe_router_topk=topk, moe_low_rank_ratio=0.25,
        moe_expert_activation=activation, tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
        sequence_parallel=tp > 1, moe_token_dispatcher_type=dispatcher,
        moe_expert_capacity_factor=capacity, moe_aux_loss_coeff=AUX_COEFF,
        moe_router_dtype="fp32", use_cpu_initialization=True, init_method_std=0.3,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, add_bias_linear=False,
    )
    torch.manual_seed(1234)  # same CPU draws on every rank: the global weights are layout-free
    layer = build_module(get_moe_module_spec(structure), config=config).to(device)
    layer.train()
    return layer, config


def global_weights(layer) -> MoEWeights:
    """Assemble the full (all experts, whole f) weights from every rank's shard, in fp32."""
    experts = layer.experts
    shard = {
        "ep": experts.ep_group.rank(), "tp": experts.tp_group.rank(),
        "w1": experts.weight1.detach().float().cpu(), "w2": experts.weight2.detach().float().cpu(),
    }
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, shard)
    e_local, chunks, f_local, d = shard["w1"].shape
    ep_size, tp_size = experts.ep_group.size(), experts.tp_group.size()
    w1 = torch.empty(e_local * ep_size, chunks, f_local * tp_size, d)
    w2 = torch.empty(e_local * ep_size, d, f_local * tp_size)
    for s in shards:
        e, f = slice(s["ep"] * e_local, (s["ep"] + 1) * e_local), slice(s["tp"] * f_local, (s["tp"] + 1) * f_local)
        w1[e, :, f], w2[e, :, f] = s["w1"], s["w2"]
    proj = lambda name: (getattr(layer, name).weight.detach().float().cpu()
                         if hasattr(layer, name) else None)
    return MoEWeights(
        router=layer.router.weight.detach().float().cpu(), w1=w1.flatten(1, 2), w2=w2,
        w_down=proj("fc1_latent_proj"), w_up=proj("fc2_latent_proj"),
    )


def rank_inputs(rank: int, dtype):
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(SEQ, BATCH, H, generator=g).to(dtype)
    grad = torch.randn(SEQ, BATCH, H, generator=g).to(dtype)
    return x, grad


def reference_rank(rank, weights, config, aux_ranks, capacity, dtype):
    """Rank `rank`'s loss in the reference: its output . grad + its share of the aux loss, whose
    expert counts and token total are taken over `aux_ranks` (the router's TP group)."""
    topk = config.moe_router_topk
    counts, total = 0, 0
    for r in aux_ranks:
        xr = rank_inputs(r, dtype)[0].float().view(-1, H)
        counts = counts + route(xr @ weights.router.t(), topk)[1].sum(0)
        total += xr.shape[0]
    x, grad = (t.float() for t in rank_inputs(rank, dtype))
    x.requires_grad_(True)
    y, logits, _ = moe_forward(
        x.view(-1, H), weights, topk, config.moe_expert_activation, capacity
    )
    loss = (y * grad.view(-1, H)).sum() + aux_loss(logits, counts, total, topk, AUX_COEFF)
    return loss, x, y.view_as(x)


def check_layout(rank, world, tp, ep, etp, cases, device="cpu", dtype=torch.float32, tol=1e-5):
    import megatron_bigmac.config  # noqa: F401  (applies the megatron-core compat shims)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    model_parallel_cuda_manual_seed(1234)
    for structure, dispatcher, capacity, activation in cases:
        label = f"{structure}/{dispatcher}/cap={capacity}/{activation} tp={tp} ep={ep} etp={etp}"
        layer, config = build_layer(structure, tp, ep, etp, dispatcher, capacity, activation,
                                    dtype, device)
        weights = global_weights(layer)
        for t in weights.tensors():
            t.requires_grad_(True)

        x, grad = (t.to(device) for t in rank_inputs(rank, dtype))
        x.requires_grad_(True)
        out, _ = layer(x)
        (out * grad).sum().backward()

        aux_ranks = dist.get_process_group_ranks(layer.router.tp_cp_group) if tp > 1 else [rank]
        loss, ref_x, ref_y = reference_rank(rank, weights, config, aux_ranks, capacity, dtype)
        own_inputs = [ref_x] + [t for t in (weights.router, weights.w_down, weights.w_up)
                                if t is not None]
        *own, w1_grad, w2_grad = torch.autograd.grad(loss, own_inputs + [weights.w1, weights.w2])
        # Expert weights also see the tokens of the other ranks of the expert TP x EP group.
        expert_grads = [w1_grad, w2_grad]
        for r in dist.get_process_group_ranks(layer.token_dispatcher.tp_ep_group):
            if r != rank:
                other, _, _ = reference_rank(r, weights, config, aux_ranks_of(r, tp), capacity,
                                             dtype)
                g = torch.autograd.grad(other, [weights.w1, weights.w2])
                expert_grads = [a + b for a, b in zip(expert_grads, g)]

        close = functools.partial(assert_close, tol=tol)
        close(out.float().cpu(), ref_y.detach(), msg=lambda m: f"{label} output: {m}")
        close(x.grad.float().cpu(), own[0], msg=lambda m: f"{label} input grad: {m}")
        close(layer.router.weight.grad.float().cpu(), own[1], msg=lambda m: f"{label} router: {m}")
        if weights.w_down is not None:
            close(layer.fc1_latent_proj.weight.grad.float().cpu(), own[2],
                  msg=lambda m: f"{label} W_down: {m}")
            close(layer.fc2_latent_proj.weight.grad.float().cpu(), own[3],
                  msg=lambda m: f"{label} W_up: {m}")
        experts = layer.experts
        e_local, chunks, f_local, d = experts.weight1.shape
        e = slice(experts.ep_group.rank() * e_local, (experts.ep_group.rank() + 1) * e_local)
        f = slice(experts.tp_group.rank() * f_local, (experts.tp_group.rank() + 1) * f_local)
        w1_grad = expert_grads[0].view(-1, chunks, f_local * experts.tp_group.size(), d)[e, :, f]
        close(experts.weight1.grad.float().cpu(), w1_grad, msg=lambda m: f"{label} W1: {m}")
        close(experts.weight2.grad.float().cpu(), expert_grads[1][e, :, f],
              msg=lambda m: f"{label} W2: {m}")
    ps.destroy_model_parallel()


def assert_close(actual, expected, tol, msg):
    """fp32: elementwise within tol. bf16 (tol > 1e-3): ||actual - expected|| / ||expected|| < tol,
    the measure for low-precision operands (elementwise bounds fail on near-zero entries)."""
    if tol <= 1e-3:
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=msg)
        return
    error = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert error < tol, msg(f"relative error {error:.2e} >= {tol}")


def aux_ranks_of(rank: int, tp: int):
    """The router's TP group in megatron-core's default order (TP varies fastest)."""
    if tp == 1:
        return [rank]
    start = rank - rank % tp
    return list(range(start, start + tp))


def cases(dispatchers=("alltoall", "allgather"), capacities=(None, 1.0)):
    return [(s, d, c, "gelu") for s in STRUCTURES for d in dispatchers for c in capacities]


def test_single_process_all_structures_with_and_without_dropping():
    activations = [("bigmac", "alltoall", None, a) for a in ("relu", "squared_relu", "swiglu")]
    run_distributed(check_layout, 1, 1, 1, 1, cases() + activations)


def test_expert_parallel_2_matches_reference():
    run_distributed(check_layout, 2, 1, 2, 1, cases())


def test_tensor_and_sequence_parallel_2_with_expert_tp_matches_reference():
    run_distributed(check_layout, 2, 2, 1, 2, cases())


def test_tensor_and_sequence_parallel_2_with_replicated_experts_matches_reference():
    run_distributed(check_layout, 2, 2, 1, 1, cases(capacities=(None,)))


def test_expert_parallel_4_matches_reference():
    run_distributed(check_layout, 4, 1, 4, 1, cases(capacities=(None,)) + [
        ("bigmac", "alltoall", 1.0, "gelu")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs on the device)")
def test_bf16_on_gpu_matches_reference():
    bf16_cases = cases() + [("bigmac", "alltoall", None, "swiglu")]
    run_distributed(check_layout, 1, 1, 1, 1, bf16_cases, "cuda", torch.bfloat16, 2e-2,
                    backend="nccl")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (runs on the device)")
def test_bf16_expert_parallel_2_on_gpus_matches_reference():
    run_distributed(check_layout, 2, 1, 2, 1, cases(), "cuda", torch.bfloat16, 2e-2,
                    backend="nccl")

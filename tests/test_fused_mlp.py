"""The experts' GELU inside their grouped GEMMs (megatron_bigmac.moe.fused_mlp): the expert MLP
and its gradients against one plain matmul chain per expert.

On a CPU the Triton kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, fp32; the
interpreter has no bf16), in a subprocess since the variable must be set before Triton is
imported. On a Hopper GPU it runs compiled, in bf16, with its autotuned tiles, and through
GroupedExperts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed

try:
    import triton  # noqa: F401
except ImportError:
    triton = None

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _reference(x, weight1, weight2, counts):
    """gelu(x_g @ W1_g^T) @ W2_g^T per expert g, in fp32."""
    chunks = torch.split(x.float(), counts.tolist())
    return torch.cat([F.gelu(c @ w1.float().t()) @ w2.float().t()
                      for c, w1, w2 in zip(chunks, weight1, weight2)])


def _inputs(counts, width, ffn, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    experts, rows = len(counts), int(sum(counts))
    x = torch.randn(rows, width, generator=generator)
    weight1 = torch.randn(experts, ffn, width, generator=generator) / width ** 0.5
    weight2 = torch.randn(experts, width, ffn, generator=generator) / ffn ** 0.5
    dy = torch.randn(rows, width, generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (x, weight1, weight2, dy)]


def _errors(fn, x, weight1, weight2, dy, counts, reference):
    """Max |difference| to ``reference`` of y, dx, dW1, dW2, each over the reference's max."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight1, weight2)]
    y = fn(*leaves)
    y.backward(dy)
    return [((a.float() - b).abs().max() / b.abs().max()).item()
            for a, b in zip([y] + [t.grad for t in leaves], reference)]


def check_against_reference(device: str, dtype: torch.dtype, block=None) -> list:
    """Fused MLP vs the fp32 reference, for shapes that exercise every masked edge: an expert
    with no rows, experts spanning several row tiles and ending inside one, K and N that are not
    multiples of the tiles. Returns (fused, unfused-torch-ops) relative errors per output."""
    from megatron_bigmac.moe.experts import grouped_linear
    from megatron_bigmac.moe.fused_mlp import GroupedGeluMLP

    counts = torch.tensor([37, 0, 100, 1, 64, 29])
    x, weight1, weight2, dy = _inputs(counts, width=40, ffn=72, dtype=dtype, device=device)
    ends = torch.cumsum(counts, 0).to(device=device, dtype=torch.int32)

    leaves = [t.detach().float().requires_grad_() for t in (x, weight1, weight2)]
    y = _reference(*leaves, counts)
    y.backward(dy.float())
    reference = [y.detach()] + [t.grad for t in leaves]

    fused = _errors(lambda a, b, c: GroupedGeluMLP.apply(a, b, c, ends, block),
                    x, weight1, weight2, dy, counts, reference)
    unfused = _errors(lambda a, b, c: grouped_linear(F.gelu(grouped_linear(a, b, counts)), c, counts),
                      x, weight1, weight2, dy, counts, reference)
    return [fused, unfused]


@pytest.mark.skipif(triton is None, reason="needs triton (its interpreter runs on CPUs)")
def test_fused_gelu_mlp_kernel_in_the_interpreter():
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_fused_mlp as t; "
        "print(t.check_against_reference('cpu', torch.float32, block=(16, 32, 16)))"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fused, unfused = eval(result.stdout.strip().splitlines()[-1])
    assert max(unfused) < 1e-5, unfused  # the reference itself
    assert max(fused) < 1e-5, fused


@pytest.mark.skipif(not HOPPER or triton is None, reason="the compiled kernel needs a Hopper GPU")
def test_fused_gelu_mlp_matches_torch_ops_in_bf16_on_gpu():
    fused, unfused = check_against_reference("cuda", torch.bfloat16)
    # Both round to bf16 at the same places, except that the kernel applies the GELU and its
    # derivative to the fp32 accumulator: no worse than the torch ops.
    for name, a, b in zip(("y", "dx", "dW1", "dW2"), fused, unfused):
        assert a < 1.5 * b + 1e-3, (name, fused, unfused)
        assert a < 2e-2, (name, fused)


def compare_grouped_experts_with_and_without_fusion(rank, world):
    from megatron.core import parallel_state as ps

    from megatron_bigmac.config import BigMacConfig
    from megatron_bigmac.moe import experts as experts_module

    ps.initialize_model_parallel()
    calls = []

    class CountingGeluMLP(experts_module.GroupedGeluMLP):
        @classmethod
        def apply(cls, *args):
            calls.append(args[0].shape)
            return super().apply(*args)

    experts_module.GroupedGeluMLP = CountingGeluMLP  # this spawned process only
    counts = torch.tensor([300, 0, 17, 512, 88, 1, 40, 250], device="cuda")
    tokens = torch.randn(int(counts.sum()), 64, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(int(counts.sum()), device="cuda")
    results = []
    for fusion in (True, False):
        config = BigMacConfig(num_layers=1, hidden_size=256, num_attention_heads=4,
                              num_moe_experts=8, moe_router_topk=2, moe_structure="bigmac",
                              moe_low_rank_ratio=0.25, bf16=True, params_dtype=torch.bfloat16,
                              use_cpu_initialization=True, moe_activation_fusion=fusion)
        assert config.moe_token_width == 64 and config.moe_ffn_hidden_size == 256
        torch.manual_seed(0)
        module = experts_module.GroupedExperts(8, config).cuda()
        leaf = tokens.clone().requires_grad_()
        output, _ = module(leaf, counts, probs)
        output.float().square().sum().backward()
        results.append([output, leaf.grad, module.weight1.grad, module.weight2.grad])
    assert len(calls) == 1  # the fused module took the fused path, the other did not
    for got, want in zip(*results):
        got, want = got.float(), want.float()
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    ps.destroy_model_parallel()


@pytest.mark.skipif(not HOPPER or triton is None, reason="the compiled kernel needs a Hopper GPU")
def test_grouped_experts_take_the_fused_mlp_on_gpu():
    run_distributed(compare_grouped_experts_with_and_without_fusion, 1, backend="nccl")

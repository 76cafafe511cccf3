"""The fused paths: FusedNorm in place of megatron-core's torch norms (same parameters, same
model), torch's fused Adam in place of its foreach one (same updates), and on a GPU the compiled
kernels of megatron_bigmac.kernels against their eager maths in bf16."""

from __future__ import annotations

import types

import pytest
import torch
from distributed import run_distributed

import megatron_bigmac  # noqa: F401  (compat shims)
from megatron_bigmac import kernels
from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.norm import FusedNorm

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8,
            moe_router_topk=2, use_cpu_initialization=True, attention_dropout=0.0,
            hidden_dropout=0.0)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_fused_norm_matches_torch_norm(normalization):
    config = BigMacConfig(**TINY, normalization=normalization)
    norm = FusedNorm(config, 64, eps=1e-5)
    reference = (torch.nn.LayerNorm(64, eps=1e-5) if normalization == "LayerNorm"
                 else torch.nn.RMSNorm(64, eps=1e-5))
    with torch.no_grad():
        for module in (norm, reference):
            module.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
            if getattr(module, "bias", None) is not None:
                module.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    assert norm.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(5, 3, 64, requires_grad=True)
    grad = torch.randn(5, 3, 64)
    outputs = []
    for module in (norm, reference):
        x.grad = None
        out = module(x)
        out.backward(grad)
        outputs.append((out, x.grad, module.weight.grad))
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want)
    assert norm.weight.sequence_parallel is False


def build_with_and_without_fused_norms(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_bigmac.specs import build_gpt_model

    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(7)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).expand(2, -1)
    causal = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), diagonal=1)
    results = {}
    for fused in (False, True):
        torch.manual_seed(0)
        config = BigMacConfig(**TINY, layernorm_fusion=fused)
        model = build_gpt_model(config, vocab_size=128, max_sequence_length=16)
        norms = [model.decoder.final_layernorm] + [
            norm for layer in model.decoder.layers
            for norm in (layer.input_layernorm, layer.pre_mlp_layernorm)]
        assert all(isinstance(n, FusedNorm) == fused for n in norms), norms
        results[fused] = (model.state_dict(), model(tokens, positions, causal))
    (state, logits), (fused_state, fused_logits) = results[False], results[True]
    assert list(state) == list(fused_state)  # checkpoints map one to one
    for key in state:
        if torch.is_tensor(state[key]):
            torch.testing.assert_close(fused_state[key], state[key], msg=key)
    torch.testing.assert_close(fused_logits, logits)
    ps.destroy_model_parallel()


def test_model_with_fused_norms_equals_model_with_torch_norms():
    run_distributed(build_with_and_without_fused_norms, 1)


def test_fused_adam_replaces_foreach_with_the_same_updates():
    from megatron_bigmac.training.optimizer import _use_fused_torch_adam

    torch.manual_seed(0)
    params = {name: [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
              for name in ("foreach", "fused")}
    for p, q in zip(*params.values()):
        q.data.copy_(p.data)
    optimizers = {name: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
                  for name, ps in params.items()}
    # megatron-core's MegatronOptimizer / ChainedOptimizer shape: .optimizer, .chained_optimizers
    _use_fused_torch_adam(types.SimpleNamespace(
        chained_optimizers=[types.SimpleNamespace(optimizer=optimizers["fused"])]))
    assert all(g["fused"] and not g["foreach"] for g in optimizers["fused"].param_groups)
    assert not optimizers["foreach"].param_groups[0]["fused"]
    for step in range(3):
        for name, ps in params.items():
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, 0.1 * (step + 1) * (i + 1)).sin_()
            optimizers[name].step()
    for p, q in zip(*params.values()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def _check_compiled_against_fp32(device: str, compile_fn) -> None:
    """Each kernel compiled, on bf16 inputs, against its maths in fp32 on the same (upcast)
    inputs: output and every input gradient within bf16 rounding (relative error of the whole
    tensor). Not against eager bf16: compiled kernels keep intermediates in fp32 (eager rounds
    each op's result to bf16), so they are closer to the fp32 maths than eager is."""
    gelu = torch.nn.functional.gelu
    torch.manual_seed(0)
    cases = [  # fn, its extra inputs for x [rows, 768] (tensors in bf16 unless fp32 by design)
        (kernels.layer_norm, lambda rows: [torch.rand(768) + 0.5, torch.randn(768), 1e-5],
         (torch.bfloat16,), False),
        (kernels.rms_norm, lambda rows: [torch.rand(768) + 0.5, 1e-5], (torch.bfloat16,), False),
        (kernels.scale_rows, lambda rows: [torch.rand(rows)], (torch.float32,), True),
        (kernels.activate_and_scale_rows, lambda rows: [torch.rand(rows), gelu],
         (torch.float32,), True),
    ]
    for fn, make_args, arg_dtypes, dynamic in cases:
        # Two row counts: a dynamic kernel must serve both (expert rows vary under EP).
        for rows in (4096, 3000) if dynamic else (4096,):
            x = torch.randn(rows, 768)
            args = make_args(rows)
            grad = torch.randn(rows, 768)
            compiled_fn = compile_fn(fn, dynamic)
            results = {}
            for name, impl, dtype in (("fp32", fn, torch.float32),
                                      ("compiled", compiled_fn, torch.bfloat16)):
                leaves = [x.to(device, dtype)] + [
                    a.to(device, torch.float32 if name == "fp32" else arg_dtypes[0])
                    for a in args if torch.is_tensor(a)]
                leaves = [t.detach().requires_grad_(True) for t in leaves]
                it = iter(leaves[1:])
                out = impl(leaves[0], *[next(it) if torch.is_tensor(a) else a for a in args])
                assert out.dtype == dtype, (fn.__name__, out.dtype)
                out.backward(grad.to(device, dtype))
                results[name] = [out] + [t.grad for t in leaves]
            for i, (got, want) in enumerate(zip(results["compiled"], results["fp32"])):
                error = (got.float() - want).norm() / want.norm()
                assert error < 1e-2, (fn.__name__, rows, i, float(error))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
def test_compiled_kernels_match_fp32_maths_in_bf16_on_gpu():
    _check_compiled_against_fp32("cuda", lambda fn, dynamic: kernels.compiled(fn, dynamic))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
def test_compiled_row_gathers_match_index_select_on_gpu():
    """The MoE permutation kernels (indirect loads): the row gather equals index_select exactly,
    the combine's sum of each token's k rows an explicit fp32 sum; two token counts through the
    same dynamic kernels (they vary under EP)."""
    torch.manual_seed(0)
    gather = kernels.compiled(kernels.gather_rows, dynamic=True)
    sum_rows = kernels.compiled(kernels.sum_token_rows, dynamic=True)
    for tokens, topk, width in ((4096, 8, 192), (3000, 8, 192)):
        x = torch.randn(tokens, width, device="cuda").bfloat16()
        rows_token = torch.randint(0, tokens, (tokens * topk,), device="cuda")
        assert torch.equal(gather(x, rows_token), x.index_select(0, rows_token))
        z = torch.randn(tokens * topk, width, device="cuda").bfloat16()
        token_rows = torch.randperm(tokens * topk, device="cuda").view(tokens, topk)
        want = torch.stack([z.float()[token_rows[:, j]] for j in range(topk)]).sum(0)
        got = sum_rows(z, token_rows)
        assert got.dtype == torch.bfloat16 and got.shape == (tokens, width)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
def test_compiled_expert_mlp_matches_eager_on_gpu():
    """The experts' MLP compiled whole (moe_activation_fusion) against the same function eager,
    in bf16: output and gradients of tokens, gate weights and both weights, with the gate weights
    on either side (BigMac-like f > d, Fine-Grained-like f < d) and two row counts through the
    same dynamic compile (they vary under EP)."""
    import torch.nn.functional as F

    from megatron_bigmac.moe.experts import expert_mlp

    torch.manual_seed(0)
    compiled_mlp = kernels.compiled(expert_mlp, dynamic=True)
    for width, ffn in ((64, 256), (256, 64)):
        for counts in ([300, 0, 17, 512, 88, 1, 40, 250], [64, 64, 0, 128, 8, 8, 16, 200]):
            counts = torch.tensor(counts, device="cuda")
            rows = int(counts.sum())
            inputs = [torch.randn(rows, width, device="cuda").bfloat16(),
                      torch.rand(rows, device="cuda"),
                      (torch.randn(8, 1, ffn, width, device="cuda") / width**0.5).bfloat16(),
                      (torch.randn(8, width, ffn, device="cuda") / ffn**0.5).bfloat16()]
            grad = torch.randn(rows, width, device="cuda").bfloat16()
            results = []
            for mlp in (expert_mlp, compiled_mlp):
                leaves = [t.clone().requires_grad_() for t in inputs]
                tokens, probs, weight1, weight2 = leaves
                out = mlp(tokens, counts, probs, weight1, weight2, F.gelu, False)
                out.backward(grad)
                results.append([out] + [t.grad for t in leaves])
            for name, got, want in zip(("out", "tokens", "probs", "w1", "w2"), *reversed(results)):
                assert got.dtype == want.dtype and got.shape == want.shape, name
                error = (got.float() - want.float()).norm() / want.float().norm()
                assert error < 1e-2, (width, ffn, rows, name, float(error))

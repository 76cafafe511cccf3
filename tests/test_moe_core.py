"""BigMac's defining property (All-to-All payload x r), config validation, parameter counts on the
meta device against the analytic model, and the SDPA attention against megatron-core's own."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

import megatron_bigmac.config  # noqa: F401  (applies the megatron-core compat shims)
from megatron_bigmac import costs
from megatron_bigmac.config import BigMacConfig

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8,
            moe_router_topk=2)


# ------------------------------------------------------------------ All-to-All payload
def measure_alltoall_payload(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe import token_dispatcher
    from test_moe_equivalence import build_layer, rank_inputs

    ps.initialize_model_parallel(expert_model_parallel_size=world)
    sent = {}
    all_to_all = token_dispatcher.all_to_all

    def counting_all_to_all(group, input_, output_split_sizes, input_split_sizes):
        if input_.dim() == 2:  # token tensors; 1-D tensors are the routing probabilities
            sent[current] += input_.numel() * input_.element_size()
        return all_to_all(group, input_, output_split_sizes, input_split_sizes)

    token_dispatcher.all_to_all = counting_all_to_all
    routers = {}
    for current in ("fine_grained", "bigmac"):
        sent[current] = 0
        layer, config = build_layer(current, ep=world)
        routers[current] = layer.router.weight.detach().clone()
        x, grad = rank_inputs(rank, torch.float32)
        x.requires_grad_(True)
        out, _ = layer(x)
        (out * grad).sum().backward()  # backward runs the two All-to-Alls in reverse
    token_dispatcher.all_to_all = all_to_all
    # Same router weights and tokens, so the same routing: only the width differs.
    torch.testing.assert_close(routers["bigmac"], routers["fine_grained"])
    r = config.moe_low_rank_ratio
    assert sent["fine_grained"] > 0
    assert sent["bigmac"] * round(1 / r) == sent["fine_grained"], sent
    totals = torch.tensor([sent["fine_grained"], sent["bigmac"]], dtype=torch.float64)
    dist.all_reduce(totals)
    assert totals[1] * round(1 / r) == totals[0]
    ps.destroy_model_parallel()


def test_bigmac_alltoall_bytes_are_r_times_fine_grained():
    run_distributed(measure_alltoall_payload, 2)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(moe_structure="mega"), "moe_structure: 'mega' is not one of bigmac, fine_grained, vanilla"),
        (dict(moe_low_rank_ratio=0.0), "moe_low_rank_ratio: must satisfy 0 < r < 1, got 0.0"),
        (dict(moe_low_rank_ratio=1.0), "moe_low_rank_ratio: must satisfy 0 < r < 1, got 1.0"),
        (dict(moe_low_rank_ratio=-0.5), "moe_low_rank_ratio: must satisfy 0 < r < 1"),
        (dict(moe_low_rank_ratio=0.3), "moe_low_rank_ratio: r * hidden_size = 0.3 * 64 = 19.2 is not an integer"),
        (dict(moe_router_topk=9), "moe_router_topk: must be in [1, num_moe_experts=8], got 9"),
        (dict(moe_router_topk=0), "moe_router_topk: must be in [1, num_moe_experts=8], got 0"),
        (dict(expert_model_parallel_size=3), "expert_model_parallel_size: 3 must divide num_moe_experts=8"),
        (dict(num_moe_experts=None), "num_moe_experts: must be an integer >= 1"),
        (dict(moe_expert_activation="tanh"), "moe_expert_activation: 'tanh' is not one of gelu, relu, squared_relu, swiglu"),
        (dict(moe_token_dispatcher_type="ring"), "moe_token_dispatcher_type: 'ring' is not one of alltoall, allgather, flex"),
        (dict(moe_token_dispatcher_type="flex"), "moe_token_dispatcher_type: 'flex' needs DeepEP"),
        (dict(moe_latent_size=16), "moe_latent_size: leave unset"),
        (dict(moe_latent_init="xavier"),
         "moe_latent_init: 'xavier' is not one of variance_preserving, megatron"),
        (dict(moe_ffn_hidden_size=30, tensor_model_parallel_size=4, num_attention_heads=4),
         "moe_ffn_hidden_size: 30 is not divisible by expert_tensor_parallel_size=4"),
    ],
)
def test_bad_config_is_rejected_with_one_line_naming_the_field(overrides, message):
    if overrides.get("moe_token_dispatcher_type") == "flex":
        from megatron_bigmac.config import _flex_backend_available
        if _flex_backend_available():
            pytest.skip("a flex backend is installed here")
    with pytest.raises(ValueError) as error:
        BigMacConfig(**{**TINY, **overrides})
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(message), text


@pytest.mark.parametrize("structure, ffn", [("bigmac", 64), ("fine_grained", 16), ("vanilla", 256)])
def test_expert_width_defaults_follow_the_structure(structure, ffn):
    config = BigMacConfig(**TINY, moe_structure=structure)
    assert config.moe_ffn_hidden_size == ffn
    assert config.moe_token_width == (16 if structure == "bigmac" else 64)


# ------------------------------------------------------------------ initialization
SMALL = dict(num_layers=12, hidden_size=768, num_attention_heads=12, num_moe_experts=64,
             moe_router_topk=8, moe_low_rank_ratio=0.25)  # configs/small


def measure_initial_scale(rank, world, results):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module

    from megatron_bigmac.specs import get_moe_module_spec

    ps.initialize_model_parallel()
    x = torch.randn(256, 4, SMALL["hidden_size"], generator=torch.Generator().manual_seed(0))
    for name, structure, init in (("fine_grained", "fine_grained", "variance_preserving"),
                                  ("variance_preserving", "bigmac", "variance_preserving"),
                                  ("megatron", "bigmac", "megatron")):
        config = BigMacConfig(**SMALL, moe_structure=structure, moe_latent_init=init,
                              use_cpu_initialization=True, add_bias_linear=False)
        torch.manual_seed(1234)
        layer = build_module(get_moe_module_spec(structure), config=config)
        with torch.no_grad():
            out, _ = layer(x)
        stds = {proj: getattr(layer, proj).weight.std().item()
                for proj in ("fc1_latent_proj", "fc2_latent_proj") if hasattr(layer, proj)}
        results[name] = (out.pow(2).mean().sqrt().item(), stds)
    ps.destroy_model_parallel()


def test_bigmac_projections_start_variance_preserving_as_large_as_fine_grained():
    """The default init keeps W_down x and W_up y' at their inputs' scale, so a BigMac layer starts
    as large as a Fine-Grained one; megatron-core's latent-MoE init (0.02, 0.02/sqrt(2L)) starts it
    ~35x smaller, which made BigMac train far slower (docs/reports/small-enwiki-1200)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    run_distributed(measure_initial_scale, 1, results)
    h, latent = SMALL["hidden_size"], round(SMALL["moe_low_rank_ratio"] * SMALL["hidden_size"])
    fine_grained, _ = results["fine_grained"]
    scale, stds = results["variance_preserving"]
    assert stds["fc1_latent_proj"] == pytest.approx(h**-0.5, rel=0.01)
    assert stds["fc2_latent_proj"] == pytest.approx(latent**-0.5, rel=0.01)
    assert 0.7 < scale / fine_grained < 1.4, (scale, fine_grained)
    scale, stds = results["megatron"]
    assert stds["fc1_latent_proj"] == pytest.approx(0.02, rel=0.01)
    assert stds["fc2_latent_proj"] == pytest.approx(0.02 / (2 * SMALL["num_layers"]) ** 0.5, rel=0.01)
    assert scale < fine_grained / 10, (scale, fine_grained)


# ------------------------------------------------------------------ parameter counts
PAPER_XL = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, num_moe_experts=64,
                moe_router_topk=8, moe_low_rank_ratio=0.25)
PAPER_PARAMS = {"fine_grained": 3.73e9, "bigmac": 3.78e9}


def count_on_meta_device(rank, world, results):
    from megatron.core import parallel_state as ps

    from megatron_bigmac.specs import build_gpt_model

    ps.initialize_model_parallel()
    for structure, overrides in (("fine_grained", {}), ("bigmac", {}),
                                 ("vanilla", dict(num_moe_experts=4, moe_router_topk=2))):
        config = BigMacConfig(**{**PAPER_XL, **overrides}, moe_structure=structure,
                              use_cpu_initialization=True, perform_initialization=False)
        with torch.device("meta"):
            model = build_gpt_model(config, vocab_size=50304, max_sequence_length=2048)
        built = sum(p.numel() for p in model.parameters())
        shape = costs.MoEModelShape.from_config(config, seq_length=2048, padded_vocab_size=50304)
        results[structure] = (built, costs.count_parameters(shape)["total"])
    ps.destroy_model_parallel()


def test_gpt3_xl_parameters_on_meta_device_match_costs_and_paper():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    run_distributed(count_on_meta_device, 1, results)
    for structure, (built, analytic) in results.items():
        assert built == analytic, (structure, built, analytic)
    for structure, stated in PAPER_PARAMS.items():
        assert abs(results[structure][0] - stated) / stated < 0.005
    # BigMac adds exactly the two shared projections, 2 * r * h^2 per layer.
    extra = results["bigmac"][0] - results["fine_grained"][0]
    assert extra == 24 * 2 * 512 * 2048


# ------------------------------------------------------------------ attention
def compare_sdpa_with_local_attention(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_bigmac.attention import QKVLinear
    from megatron_bigmac.specs import build_gpt_model

    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(7)
    # apply_query_key_layer_scaling: megatron-core divides layer L's scores by L and its softmax
    # multiplies them back; SDPA must use the product.
    for layer_scaling in (False, True):
        config = BigMacConfig(**TINY, use_cpu_initialization=True, attention_dropout=0.0,
                              hidden_dropout=0.0, apply_query_key_layer_scaling=layer_scaling)
        logits, grads = {}, {}
        for attention in ("local", "sdpa"):
            torch.manual_seed(0)
            model = build_gpt_model(config, vocab_size=128, max_sequence_length=32,
                                    attention=attention)
            tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
            positions = torch.arange(32).expand(2, -1)
            causal = torch.triu(torch.ones(1, 1, 32, 32, dtype=torch.bool), diagonal=1)
            out = model(tokens, positions, causal)
            out.float().pow(2).mean().backward()
            logits[attention] = out.detach()
            qkv = model.decoder.layers[-1].self_attention.linear_qkv
            assert isinstance(qkv, QKVLinear) == (attention == "sdpa")
            assert qkv.bias is not None  # add_bias_linear: the epilogue path is the one taken
            grads[attention] = (qkv.weight.grad, qkv.bias.grad)
        torch.testing.assert_close(logits["sdpa"], logits["local"], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads["sdpa"], grads["local"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ps.destroy_model_parallel()


def test_sdpa_attention_matches_megatron_local_attention():
    run_distributed(compare_sdpa_with_local_attention, 1)


def test_foreach_grad_norm_and_scale_replace_megatron_fallbacks():
    """compat's foreach versions of megatron-core's no-apex fallbacks (one host sync per
    gradient in the norm) are installed and give the fallbacks' results."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    from megatron_bigmac import compat

    assert clip_grads.l2_norm_impl is compat._foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is compat._foreach_scale
    assert optimizer.multi_tensor_scale_impl is compat._foreach_scale
    grads = [torch.randn(5), torch.randn(3, 4), torch.randn(7, 2)]
    norm, _ = compat._foreach_l2_norm(0, None, [grads], False)
    expected, _ = utils.local_multi_tensor_l2_norm(0, None, [grads], False)
    torch.testing.assert_close(norm, expected)
    sources = [torch.randn(4), torch.randn(2, 3)]
    got = [torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2, 3)]
    want = [torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2, 3)]
    compat._foreach_scale(0, None, [sources, got], 0.37)
    utils.local_multi_tensor_scale(0, None, [sources, want], 0.37)
    for a, b in zip(got, want):
        assert torch.equal(a, b)

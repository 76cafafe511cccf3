"""megatron_bigmac.costs: the paper's Table 3/4 figures, a hand-counted tiny model, bad input."""

from types import SimpleNamespace

import pytest

from megatron_bigmac.costs import (
    GIB,
    MoEModelShape,
    alltoall_bytes_per_iteration,
    count_parameters,
    main,
    paper_shape,
    paper_table,
    training_flops_per_iteration,
)

BATCH = 256  # x 2048 tokens = 0.5 M tokens, Table 5


# --- the paper's GPT3-XL figures (arXiv 2502.16927, Tables 3 and 4) ---------------------

@pytest.mark.parametrize("structure, stated", [("fine_grained", 3.73), ("bigmac", 3.78)])
def test_paper_parameters(structure, stated):
    total = count_parameters(paper_shape(structure))["total"]
    assert f"{total / 1e9:.2f}" == f"{stated:.2f}"
    assert abs(total / 1e9 - stated) / stated < 0.005


def test_bigmac_adds_exactly_the_two_projections():
    fine, big = count_parameters(paper_shape("fine_grained")), count_parameters(paper_shape("bigmac"))
    h, r_h = 2048, 512
    assert big["total"] - fine["total"] == 24 * 2 * r_h * h
    assert big["experts"] == fine["experts"]  # same 2*r*h^2 weights per expert
    assert big["moe_layer"] - fine["moe_layer"] == 2 * r_h * h


def test_vanilla_has_the_same_expert_parameters():
    # 4 x (h -> 4h -> h) = 64 x (h -> h/4 -> h) = 32 h^2; only the router (h x E + E) differs.
    vanilla, fine = count_parameters(paper_shape("vanilla")), count_parameters(paper_shape("fine_grained"))
    assert vanilla["experts"] == fine["experts"]
    assert fine["moe_layer"] - vanilla["moe_layer"] == (2048 + 1) * (64 - 4)


@pytest.mark.parametrize("structure, stated", [("fine_grained", "3,490.67"), ("bigmac", "3,649.00")])
def test_paper_flops(structure, stated):
    flops = training_flops_per_iteration(paper_shape(structure), BATCH)
    assert f"{flops / 1e12:,.2f}" == stated


@pytest.mark.parametrize("structure, stated", [("fine_grained", 1488), ("bigmac", 372)])
def test_paper_alltoall(structure, stated):
    assert alltoall_bytes_per_iteration(paper_shape(structure), BATCH, ep=32) / GIB == stated


@pytest.mark.parametrize("hidden_size", [2048, 1024])
@pytest.mark.parametrize("ep", [2, 4, 8, 32, 64])
def test_traffic_ratio_is_exactly_r(hidden_size, ep):
    fine = alltoall_bytes_per_iteration(paper_shape("fine_grained", hidden_size), BATCH, ep)
    big = alltoall_bytes_per_iteration(paper_shape("bigmac", hidden_size), BATCH, ep)
    assert big / fine == 0.25


def test_no_traffic_without_expert_parallelism():
    assert alltoall_bytes_per_iteration(paper_shape("bigmac"), BATCH, ep=1) == 0


def test_medium_variant():
    shape = paper_shape("bigmac", hidden_size=1024)
    assert shape.latent_size == 256
    params = count_parameters(shape)
    assert params["projections"] == 24 * 2 * 1024 * 256
    assert alltoall_bytes_per_iteration(shape, BATCH, ep=32) / GIB == 186


def test_table_and_cli(capsys):
    rows = {(r["model"], r["structure"]): r for r in paper_table()}
    assert rows[("GPT3-XL", "bigmac")]["stated_tflops"] == 3649.00
    assert rows[("GPT3-Medium", "bigmac")]["stated_params_b"] is None
    main()
    out = capsys.readouterr().out
    for figure in ("3.73", "3.78", "3,490.67", "3,649.00", "1,488", "372", "GPT3-Medium"):
        assert figure in out


# --- a tiny model counted by hand ------------------------------------------------------------

def tiny(structure="bigmac", **overrides):
    # L=2, h=8, 2 heads, s=4, V=16, E=4, top-2; bigmac r=0.5 (r*h=4, f=h=8), fine-grained f=4.
    fields = dict(num_layers=2, hidden_size=8, num_attention_heads=2, seq_length=4,
                  padded_vocab_size=16, num_experts=4, topk=2, structure=structure,
                  expert_ffn_hidden_size=8 if structure == "bigmac" else 4,
                  latent_size=4 if structure == "bigmac" else None)
    fields.update(overrides)
    return MoEModelShape(**fields)


def test_tiny_parameters_by_hand():
    p = count_parameters(tiny())
    assert p["embedding"] == 16 * 8 + 4 * 8  # words 128 + positions 32
    assert p["output_layer"] == 0  # tied
    assert p["attention"] == 2 * ((8 * 24 + 24) + (8 * 8 + 8))  # QKV + proj with biases = 2 x 288
    assert p["layernorm"] == 5 * 16  # 2 per layer + final, weight and bias
    assert p["router"] == 2 * (32 + 4)  # h x E weights + E biases (linear_bias, megatron's default)
    assert p["projections"] == 2 * (8 * 4 + 4 * 8)
    assert p["experts"] == 2 * 4 * (4 * 8 + 8 * 4)
    assert p["moe_layer"] == 36 + 64 + 256
    assert p["total"] == 160 + 576 + 80 + 72 + 128 + 512 == 1528


def test_tiny_flops_by_hand():
    # per token per layer: attention linears 2*(8*24 + 64) = 512, scores 2*2*4*8 = 128,
    # experts 2 * 2*(4*8 + 8*4) = 256, projections 2*2*8*4 = 128  -> 1024; logits 2*8*16 = 256
    assert training_flops_per_iteration(tiny(), 3) == 3 * 12 * (2 * 1024 + 256)


def test_tiny_alltoall_by_hand():
    # C = 2 * topk * (ep-1)/ep * tokens * d = 2*2*(1/2)*12*4 = 96 elements per layer per pass
    assert alltoall_bytes_per_iteration(tiny(), 3, ep=2) == 2 * 2 * 96 * 2
    assert alltoall_bytes_per_iteration(tiny("fine_grained"), 3, ep=2) == 2 * 2 * 192 * 2


def test_gated_and_untied_and_rmsnorm():
    plain, gated = count_parameters(tiny()), count_parameters(tiny(gated=True))
    assert gated["experts"] - plain["experts"] == 2 * 4 * (4 * 8)  # a second fc1 half per expert
    assert count_parameters(tiny(untie_embeddings=True))["output_layer"] == 16 * 8
    assert count_parameters(tiny(normalization="RMSNorm"))["layernorm"] == 5 * 8
    assert count_parameters(tiny(linear_bias=False))["attention"] == 2 * (8 * 24 + 8 * 8)


# --- from_config ----------------------------------------------------------------------------

def xl_config(**overrides):
    fields = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, num_moe_experts=64,
                  moe_router_topk=8, moe_ffn_hidden_size=2048, gated_linear_unit=False,
                  moe_structure="bigmac", moe_low_rank_ratio=0.25)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_from_config_matches_paper_shape():
    assert MoEModelShape.from_config(xl_config(), 2048, 50304) == paper_shape("bigmac")
    fine = xl_config(moe_structure="fine_grained", moe_ffn_hidden_size=512)
    assert MoEModelShape.from_config(fine, 2048, 50304) == paper_shape("fine_grained")


def test_from_config_reads_a_real_transformer_config():
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=24, hidden_size=2048, num_attention_heads=16,
                               num_moe_experts=64, moe_router_topk=8, moe_ffn_hidden_size=512)
    assert MoEModelShape.from_config(config, 2048, 50304) == paper_shape("fine_grained")


def test_from_config_overrides():
    shape = MoEModelShape.from_config(xl_config(), 2048, 50304, learned_position_embeddings=False)
    assert count_parameters(paper_shape("bigmac"))["embedding"] - count_parameters(shape)["embedding"] == 2048 * 2048


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(structure="dense"), "structure"),
    (dict(latent_size=None), "latent_size"),
    (dict(latent_size=8), "latent_size"),
    (dict(topk=5), "topk"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(normalization="BatchNorm"), "normalization"),
])
def test_bad_shape(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        tiny(**overrides)


def test_latent_size_only_for_bigmac():
    with pytest.raises(ValueError, match="^latent_size:"):
        tiny("fine_grained", latent_size=4)


def test_bad_config():
    with pytest.raises(ValueError, match="^structure:.*bigmac"):
        MoEModelShape.from_config(xl_config(moe_structure="big_mac"), 2048, 50304)
    with pytest.raises(ValueError, match="^num_moe_experts:"):
        MoEModelShape.from_config(xl_config(num_moe_experts=None), 2048, 50304)


@pytest.mark.parametrize("ep", [0, -1, 3])
def test_bad_ep(ep):
    with pytest.raises(ValueError, match="^ep:"):
        alltoall_bytes_per_iteration(paper_shape("bigmac"), BATCH, ep=ep)


def test_bad_batch_and_bytes():
    with pytest.raises(ValueError, match="^global_batch_size:"):
        training_flops_per_iteration(paper_shape("bigmac"), 0)
    with pytest.raises(ValueError, match="^bytes_per_element:"):
        alltoall_bytes_per_iteration(paper_shape("bigmac"), BATCH, ep=32, bytes_per_element=0)

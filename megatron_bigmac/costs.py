"""Analytic costs of a GPT MoE model: parameters, training FLOPs, All-to-All bytes.

Pure Python and cheap (no torch, no megatron import), so configs, reports and tests can
call it freely. It reproduces the figures the BigMac paper (Jin et al., AAAI 2025,
arXiv 2502.16927) states for GPT3-XL (24 layers, h=2048, 16 heads, seq 2048, vocab
padded to 50,304, 64 experts, top-8, r=0.25; Tables 3 and 4, Eq. 1):

    figure                              Fine-Grained     BigMac      formula that gives it
    total parameters                    3.73 B           3.78 B      count_parameters, tied embeddings
    FLOPs / iteration (256 x 2048)      3,490.67 T       3,649.00 T  Megatron-LM's formula (see below)
    All-to-All / iteration (BF16, ep=32) 1,488 GiB       372 GiB     Eq. 1 x 2 passes x 24 layers

Three MoE structures (every layer is an MoE layer; no shared experts):
    fine_grained  E experts h -> f -> h            (paper: f = r*h = 512)
    bigmac        x' = x W_down (h -> r*h), E experts r*h -> f -> r*h (paper: f = h),
                  y = y' W_up (r*h -> h); W_down/W_up shared by the layer's experts, no bias
    vanilla       a few large experts h -> f -> h (e.g. 4 experts of f = 4h: equal expert params)
The router always reads the full-width x (h x E weights, a bias with add_bias_linear).

Run `python -m megatron_bigmac.costs` for the paper comparison table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

STRUCTURES = ("bigmac", "fine_grained", "vanilla")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
GIB = 2**30

# What the paper states (Tables 3/4, GPT3-XL); None where it states nothing.
PAPER_STATED = {
    ("GPT3-XL", "fine_grained"): {"params_b": 3.73, "tflops": 3490.67, "a2a_gib": 1488.0},
    ("GPT3-XL", "bigmac"): {"params_b": 3.78, "tflops": 3649.00, "a2a_gib": 372.0},
}


def _bad(field: str, got, allowed: str) -> ValueError:
    """One-line error that names the field and what it may be (project style)."""
    return ValueError(f"{field}: got {got!r}; allowed: {allowed}")


@dataclass(frozen=True)
class MoEModelShape:
    """Everything the cost formulas need about a GPT MoE model, and nothing else."""

    num_layers: int
    hidden_size: int  # h
    num_attention_heads: int
    seq_length: int  # s
    padded_vocab_size: int  # V, after Megatron's padding (50,257 -> 50,304 for GPT-2 BPE)
    num_experts: int  # E
    topk: int
    structure: str  # "bigmac" | "fine_grained" | "vanilla"
    expert_ffn_hidden_size: int  # h_f, the experts' inner width
    latent_size: int | None  # r*h for bigmac, None otherwise
    gated: bool = False  # swiglu experts: fc1 is twice as wide
    # Tied input/output embeddings (Megatron's default). Untied adds V*h = 103 M at GPT3-XL
    # and gives 3.84 B / 3.89 B; tied gives the paper's 3.73 B / 3.78 B.
    untie_embeddings: bool = False
    # Biases on QKV and attention-proj linears (Megatron's add_bias_linear default). They are
    # 0.2 M at GPT3-XL, below the paper's printed precision, so the paper cannot decide this.
    linear_bias: bool = True
    # Biases on the experts' two linears. Off: with them, 64 experts x 24 layers add 3.9 M
    # and the paper's 3.73 B / 3.78 B would print as 3.74 B / 3.79 B.
    expert_bias: bool = False
    normalization: str = "LayerNorm"  # LayerNorm has weight+bias (2h), RMSNorm weight only (h)
    learned_position_embeddings: bool = True  # GPT-3: learned s x h table; False for RoPE
    num_query_groups: int | None = None  # GQA; None = plain multi-head attention

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "padded_vocab_size", "num_experts", "topk", "expert_ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(name, value, "a positive integer")
        if self.structure not in STRUCTURES:
            raise _bad("structure", self.structure, ", ".join(STRUCTURES))
        if self.topk > self.num_experts:
            raise _bad("topk", self.topk, f"1..num_experts ({self.num_experts})")
        if self.hidden_size % self.num_attention_heads:
            raise _bad("num_attention_heads", self.num_attention_heads,
                       f"a divisor of hidden_size ({self.hidden_size})")
        if self.structure == "bigmac":
            ok = (isinstance(self.latent_size, int) and not isinstance(self.latent_size, bool)
                  and 0 < self.latent_size < self.hidden_size)
            if not ok:
                raise _bad("latent_size", self.latent_size,
                           f"an integer r*h with 0 < r*h < hidden_size ({self.hidden_size}) for bigmac")
        elif self.latent_size is not None:
            raise _bad("latent_size", self.latent_size, f"None for structure {self.structure!r}")
        if self.normalization not in NORMALIZATIONS:
            raise _bad("normalization", self.normalization, ", ".join(NORMALIZATIONS))
        groups = self.num_query_groups
        if groups is not None and (not isinstance(groups, int) or groups < 1
                                   or self.num_attention_heads % groups):
            raise _bad("num_query_groups", groups,
                       f"None or a divisor of num_attention_heads ({self.num_attention_heads})")

    @property
    def io_size(self) -> int:
        """Width of the tokens the experts see and the All-to-All carries: r*h or h."""
        return self.latent_size if self.structure == "bigmac" else self.hidden_size

    @property
    def kv_size(self) -> int:
        """Total width of K (= of V): h for multi-head attention, less with GQA."""
        groups = self.num_query_groups or self.num_attention_heads
        return groups * (self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_config(cls, config, seq_length: int, padded_vocab_size: int,
                    **overrides) -> "MoEModelShape":
        """Read a megatron TransformerConfig (or any object with the same attribute names).

        Project fields: `moe_structure` (str) and `moe_low_rank_ratio` (r); bigmac's latent
        size is round(r * hidden_size), or megatron's own `moe_latent_size` when r is absent.
        `overrides` replace any field afterwards (e.g. learned_position_embeddings=False
        for RoPE, which lives on GPTModel, not on the config).
        """
        h = config.hidden_size
        experts = getattr(config, "num_moe_experts", None)
        if not experts:
            raise _bad("num_moe_experts", experts, "a positive integer (this module counts MoE models)")
        upstream_latent = getattr(config, "moe_latent_size", None)
        structure = getattr(config, "moe_structure", None) or (
            "bigmac" if upstream_latent else "fine_grained")
        latent = None
        if structure == "bigmac":
            r = getattr(config, "moe_low_rank_ratio", None)
            latent = round(r * h) if r is not None else upstream_latent
        ffn = getattr(config, "moe_ffn_hidden_size", None) or getattr(config, "ffn_hidden_size", None)
        fields = dict(
            num_layers=config.num_layers,
            hidden_size=h,
            num_attention_heads=config.num_attention_heads,
            seq_length=seq_length,
            padded_vocab_size=padded_vocab_size,
            num_experts=experts,
            topk=getattr(config, "moe_router_topk", 2),  # megatron's default
            structure=structure,
            expert_ffn_hidden_size=ffn,
            latent_size=latent,
            gated=bool(getattr(config, "gated_linear_unit", False))
            or getattr(config, "moe_expert_activation", None) == "swiglu",
            untie_embeddings=bool(getattr(config, "untie_embeddings_and_output_weights", False)),
            linear_bias=bool(getattr(config, "add_bias_linear", True)),
            normalization=getattr(config, "normalization", "LayerNorm"),
            num_query_groups=getattr(config, "num_query_groups", None),
        )
        if fields["num_query_groups"] == fields["num_attention_heads"]:
            fields["num_query_groups"] = None  # megatron fills it in for plain MHA
        fields.update(overrides)
        return cls(**fields)


def paper_shape(structure: str, hidden_size: int = 2048, **overrides) -> MoEModelShape:
    """The paper's models: GPT3-XL (h=2048) or GPT3-Medium (h=1024), 24 layers, 16 heads.

    fine_grained: 64 experts h -> r*h -> h, top-8.   bigmac: 64 experts r*h -> h -> r*h, top-8.
    vanilla (open in the paper): 4 experts h -> 4h -> h, top-2 (GShard-style), the same expert
    parameters as fine_grained (only the router, h x E, is smaller).
    """
    r_h = hidden_size // 4  # r = 0.25
    per_structure = {
        "fine_grained": dict(num_experts=64, topk=8, expert_ffn_hidden_size=r_h, latent_size=None),
        "bigmac": dict(num_experts=64, topk=8, expert_ffn_hidden_size=hidden_size, latent_size=r_h),
        "vanilla": dict(num_experts=4, topk=2, expert_ffn_hidden_size=4 * hidden_size, latent_size=None),
    }
    if structure not in per_structure:
        raise _bad("structure", structure, ", ".join(STRUCTURES))
    shape = MoEModelShape(num_layers=24, hidden_size=hidden_size, num_attention_heads=16,
                          seq_length=2048, padded_vocab_size=50304, structure=structure,
                          **per_structure[structure])
    return replace(shape, **overrides)


def count_parameters(shape: MoEModelShape) -> dict:
    """Parameter counts (Table 3). Keys, all whole-model sums unless noted:

    embedding     word embeddings V*h (+ learned positions s*h)
    output_layer  V*h when untied, else 0 (tied: the logits reuse the word embeddings)
    attention     QKV + output projection (+ biases), all layers
    layernorm     two norms per layer + the final norm
    router        h*E per layer (+ E biases with linear_bias, as megatron-core's TopKRouter)
    projections   BigMac's W_down h x r*h and W_up r*h x h per layer, all layers (0 otherwise)
    experts       all experts of all layers
    moe_layer     router + projections + experts of ONE layer (not a sum over layers)
    total         everything above except moe_layer

    BigMac adds exactly 2*r*h^2 per layer over Fine-Grained (the projections): at GPT3-XL
    24 x 2 x 512 x 2048 = 50.3 M, 3.7344 B -> 3.7848 B, printed 3.73 B vs 3.78 B.
    """
    h, L, E = shape.hidden_size, shape.num_layers, shape.num_experts
    d, f = shape.io_size, shape.expert_ffn_hidden_size
    fc1_out = 2 * f if shape.gated else f  # swiglu: gate and up halves in one fc1

    per_expert = d * fc1_out + f * d + (fc1_out + d if shape.expert_bias else 0)
    router = h * E + (E if shape.linear_bias else 0)
    projections = 2 * h * d if shape.structure == "bigmac" else 0
    moe_layer = router + projections + E * per_expert

    qkv_out = h + 2 * shape.kv_size
    bias = shape.linear_bias
    attention = h * qkv_out + (qkv_out if bias else 0) + h * h + (h if bias else 0)
    norm = 2 * h if shape.normalization == "LayerNorm" else h

    counts = {
        "embedding": shape.padded_vocab_size * h
        + (shape.seq_length * h if shape.learned_position_embeddings else 0),
        "output_layer": shape.padded_vocab_size * h if shape.untie_embeddings else 0,
        "attention": L * attention,
        "layernorm": (2 * L + 1) * norm,
        "router": L * router,
        "projections": L * projections,
        "experts": L * E * per_expert,
    }
    counts["total"] = sum(counts.values())
    counts["moe_layer"] = moe_layer
    return counts


def training_flops_per_iteration(shape: MoEModelShape, global_batch_size: int) -> float:
    """Training FLOPs of one iteration (Table 4), Megatron-LM's formula extended to BigMac.

    Convention of Megatron-LM's `num_floating_point_operations` (Narayanan et al. 2021):
    a (m x k) @ (k x n) matmul costs 2*m*n*k; training = 3 x forward (backward = 2 x forward,
    no recomputation); only matmuls count (no router, softmax, norms, activations, biases).
    Per token, per layer, forward:
        attention linears   2 * (h*(h + 2*kv) + h*h)             (= 8h^2 without GQA)
        attention core      2 * 2 * s * h   QK^T and AV over the FULL s x s (no causal halving)
        experts             topk * 2 * (d*fc1_out + f*d)         (d = h, or r*h for bigmac)
        BigMac projections  2 * 2 * h * r*h                      (W_down and W_up, once per token)
    plus the logits layer 2 * h * V per token. FLOPs = 3 * b * s * (L * layer + logits).
    At GPT3-XL, b*s = 256 x 2048 this gives 3,490.674 T (Fine-Grained) and 3,649.004 T (BigMac),
    the paper's 3,490.67 T and 3,649.00 T. Variants that do not match: counting the router
    (+9.9 T: 3,500.57 / 3,658.90), halving the causal scores (3,174.02 / 3,332.34), dropping
    the logits (3,166.59 / 3,324.92).
    """
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise _bad("global_batch_size", global_batch_size, "a positive integer")
    h, s = shape.hidden_size, shape.seq_length
    d, f = shape.io_size, shape.expert_ffn_hidden_size
    fc1_out = 2 * f if shape.gated else f

    attention_linears = 2 * (h * (h + 2 * shape.kv_size) + h * h)
    attention_core = 2 * 2 * s * h
    experts = shape.topk * 2 * (d * fc1_out + f * d)
    projections = 2 * 2 * h * d if shape.structure == "bigmac" else 0
    per_layer = attention_linears + attention_core + experts + projections
    logits = 2 * h * shape.padded_vocab_size

    tokens = global_batch_size * s
    return float(3 * tokens * (shape.num_layers * per_layer + logits))


def alltoall_bytes_per_iteration(shape: MoEModelShape, global_batch_size: int, ep: int,
                                 bytes_per_element: int = 2) -> float:
    """All-to-All bytes of one training iteration, summed over all ranks (Eq. 1, Table 4).

    Eq. 1: one MoE layer moves C = 2 * topk * (ep-1)/ep * b * s * d elements in one pass,
    the 2 being dispatch + combine; each token is sent to topk experts and, with uniform
    routing, (ep-1)/ep of those copies leave their rank. d = h for Fine-Grained/Vanilla and
    r*h for BigMac, so BigMac's traffic is exactly r times Fine-Grained's.
    The backward pass repeats both All-to-Alls (gradients travel the reverse way), so an
    iteration is L layers x 2 passes x C. GPT3-XL, b*s = 256 x 2048, ep=32, BF16:
    24 x 2 x (2 x 8 x 31/32 x 524,288 x 2,048) x 2 bytes = 1,488 GiB; BigMac 372 GiB.
    """
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise _bad("global_batch_size", global_batch_size, "a positive integer")
    if not isinstance(ep, int) or ep < 1:
        raise _bad("ep", ep, "a positive integer")
    if shape.num_experts % ep:
        raise _bad("ep", ep, f"a divisor of num_experts ({shape.num_experts})")
    if not isinstance(bytes_per_element, int) or bytes_per_element < 1:
        raise _bad("bytes_per_element", bytes_per_element, "a positive integer (2 for BF16)")
    tokens = global_batch_size * shape.seq_length
    passes = 2  # forward and backward
    # Integer numerator first, one division last: exact whenever ep divides the product.
    numerator = shape.num_layers * passes * 2 * shape.topk * (ep - 1) * tokens * shape.io_size
    return numerator * bytes_per_element / ep


def paper_table(global_batch_size: int = 256, ep: int = 32, bytes_per_element: int = 2) -> list[dict]:
    """Rows comparing our figures with the paper's, for GPT3-XL and GPT3-Medium.

    Vanilla (4 experts) cannot use ep=32, so its row uses ep = min(ep, num_experts).
    `stated_*` is None where the paper states nothing.
    """
    rows = []
    for model, h in (("GPT3-XL", 2048), ("GPT3-Medium", 1024)):
        for structure in ("fine_grained", "bigmac", "vanilla"):
            shape = paper_shape(structure, hidden_size=h)
            row_ep = min(ep, shape.num_experts)
            stated = PAPER_STATED.get((model, structure), {})
            rows.append({
                "model": model,
                "structure": structure,
                "ep": row_ep,
                "params_b": count_parameters(shape)["total"] / 1e9,
                "stated_params_b": stated.get("params_b"),
                "tflops": training_flops_per_iteration(shape, global_batch_size) / 1e12,
                "stated_tflops": stated.get("tflops"),
                "a2a_gib": alltoall_bytes_per_iteration(shape, global_batch_size, row_ep,
                                                        bytes_per_element) / GIB,
                "stated_a2a_gib": stated.get("a2a_gib"),
            })
    return rows


def main() -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print("Per iteration: 256 x 2048 tokens, BF16 All-to-All. Paper: arXiv 2502.16927 Tables 3/4.")
    header = (f"{'model':<12}{'structure':<14}{'ep':>4}{'params B':>10}{'paper':>8}"
              f"{'FLOPs T':>12}{'paper':>12}{'A2A GiB':>10}{'paper':>8}")
    print(header)
    print("-" * len(header))
    for row in paper_table():
        print(f"{row['model']:<12}{row['structure']:<14}{row['ep']:>4}"
              f"{row['params_b']:>10.2f}{fmt(row['stated_params_b'], '.2f'):>8}"
              f"{row['tflops']:>12,.2f}{fmt(row['stated_tflops'], ',.2f'):>12}"
              f"{row['a2a_gib']:>10,.0f}{fmt(row['stated_a2a_gib'], ',.0f'):>8}")


if __name__ == "__main__":
    main()

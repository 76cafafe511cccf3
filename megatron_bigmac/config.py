"""BigMacConfig: megatron-core's TransformerConfig plus the MoE structure (BigMac, Fine-Grained,
Vanilla) and BigMac's low-rank ratio r.

Every layer of the model is an MoE layer (the paper's setting). Each field has a docstring; all
validation runs in `__post_init__` and raises `ValueError` whose one line starts with the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_bigmac import compat

compat.apply()  # idempotent; also done by `import megatron_bigmac`

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

STRUCTURES = ("bigmac", "fine_grained", "vanilla")
EXPERT_ACTIVATIONS = ("gelu", "relu", "squared_relu", "swiglu")
DISPATCHERS = ("alltoall", "allgather", "flex")
LATENT_INITS = ("variance_preserving", "megatron")


def _fail(field: str, message: str) -> None:
    raise ValueError(f"{field}: {message}")


@dataclass
class BigMacConfig(TransformerConfig):
    """A GPT MoE transformer whose MoE layers have one of three structures (PAPERS.md section 1).

    * ``bigmac``: descend ``h -> r*h`` (shared, no bias), dispatch at ``r*h``, experts
      ``r*h -> h_f -> r*h``, weighted combine at ``r*h``, ascend ``r*h -> h`` (shared, no bias).
    * ``fine_grained``: DeepSeekMoE-style experts ``h -> r*h -> h`` (``h_f = r*h`` by default).
    * ``vanilla``: a few large experts ``h -> 4h -> h``.

    The router always reads the full-width hidden state.
    """

    moe_structure: str = "bigmac"
    """One of "bigmac", "fine_grained", "vanilla"."""

    moe_low_rank_ratio: float = 0.25
    """r in the paper: BigMac's latent width is r*h, Fine-Grained's expert width is r*h. 0 < r < 1,
    and r*h must be an integer."""

    moe_expert_activation: str = "gelu"
    """Expert activation: "gelu" (default, Megatron's), "relu" (the paper's figure says "like
    ReLU"), "squared_relu", or "swiglu" (gated; doubles the experts' first matrix). The paper does
    not say which one it trained with."""

    moe_latent_init: str = "variance_preserving"
    """How BigMac's shared projections start (the paper leaves it open). "variance_preserving":
    W_down ~ N(0, 1/h) and W_up ~ N(0, 1/(r*h)), so each keeps its input's scale and the BigMac
    layer starts as large as the Fine-Grained one, its experts getting gradients as large.
    "megatron": megatron-core's latent MoE choice, W_down with ``init_method`` and W_up with
    ``output_layer_init_method`` (N(0, 0.02) and N(0, 0.02/sqrt(2L))); it makes the layer ~35x
    smaller at the start and its expert gradients ~40x smaller (measured, configs/small), which
    Adam's eps (1e-8) partly swallows: BigMac trained much slower with it (docs/reports)."""

    layernorm_fusion: bool = False
    """Compute the layer norms (LayerNorm or RMSNorm) with compiled kernels on GPUs
    (megatron_bigmac.norm.FusedNorm) instead of PyTorch's eager ones; for the path without
    transformer-engine or apex, whose fused norms megatron-core otherwise uses."""

    moe_activation_fusion: bool = False
    """Compile the experts' MLP (GroupedExperts) whole on GPUs, so that its activation, gate
    weighting and casts are one kernel each way around the grouped GEMMs instead of a pass over
    the expert rows per operation."""

    def __post_init__(self):
        self._validate_moe_structure()
        super().__post_init__()

    # ------------------------------------------------------------------ derived widths
    @property
    def moe_latent_dim(self) -> Optional[int]:
        """Width of dispatched tokens for BigMac (r*h); None for the full-width structures."""
        if self.moe_structure != "bigmac":
            return None
        return round(self.moe_low_rank_ratio * self.hidden_size)

    @property
    def moe_token_width(self) -> int:
        """Width of the tokens that travel through dispatch and combine."""
        return self.moe_latent_dim or self.hidden_size

    # ------------------------------------------------------------------ validation
    def _validate_moe_structure(self) -> None:
        if self.moe_structure not in STRUCTURES:
            _fail("moe_structure", f"{self.moe_structure!r} is not one of {', '.join(STRUCTURES)}")
        if self.moe_expert_activation not in EXPERT_ACTIVATIONS:
            _fail(
                "moe_expert_activation",
                f"{self.moe_expert_activation!r} is not one of {', '.join(EXPERT_ACTIVATIONS)}",
            )
        if self.moe_latent_init not in LATENT_INITS:
            _fail("moe_latent_init",
                  f"{self.moe_latent_init!r} is not one of {', '.join(LATENT_INITS)}")
        if self.num_moe_experts is None or self.num_moe_experts < 1:
            _fail("num_moe_experts", f"must be an integer >= 1, got {self.num_moe_experts}")
        if not 1 <= self.moe_router_topk <= self.num_moe_experts:
            _fail(
                "moe_router_topk",
                f"must be in [1, num_moe_experts={self.num_moe_experts}], got {self.moe_router_topk}",
            )
        ep = self.expert_model_parallel_size
        if ep < 1 or self.num_moe_experts % ep:
            _fail(
                "expert_model_parallel_size",
                f"{ep} must divide num_moe_experts={self.num_moe_experts}",
            )
        if self.moe_token_dispatcher_type not in DISPATCHERS:
            _fail(
                "moe_token_dispatcher_type",
                f"{self.moe_token_dispatcher_type!r} is not one of {', '.join(DISPATCHERS)}",
            )
        if self.moe_token_dispatcher_type == "flex" and not _flex_backend_available():
            _fail(
                "moe_token_dispatcher_type",
                "'flex' needs DeepEP (deep_ep) or HybridEP installed; use 'alltoall' or 'allgather'",
            )
        if self.moe_latent_size is not None:
            # megatron-core's own latent MoE needs transformer-engine; ours is driven by r.
            _fail(
                "moe_latent_size",
                "leave unset; BigMac's latent width is moe_low_rank_ratio * hidden_size",
            )
        if self.moe_shared_expert_intermediate_size is not None:
            _fail("moe_shared_expert_intermediate_size", "shared experts are not part of these structures")

        r, h = self.moe_low_rank_ratio, self.hidden_size
        if self.moe_structure in ("bigmac", "fine_grained"):
            if not 0 < r < 1:
                _fail("moe_low_rank_ratio", f"must satisfy 0 < r < 1, got {r}")
            if not math.isclose(r * h, round(r * h), abs_tol=1e-6):
                _fail(
                    "moe_low_rank_ratio",
                    f"r * hidden_size = {r} * {h} = {r * h} is not an integer",
                )
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = {
                "bigmac": h,  # h_f = h: same weights per expert as fine-grained (2*r*h^2)
                "fine_grained": round(r * h),
                "vanilla": 4 * h,
            }[self.moe_structure]
        if self.moe_ffn_hidden_size < 1:
            _fail("moe_ffn_hidden_size", f"must be >= 1, got {self.moe_ffn_hidden_size}")
        etp = self.expert_tensor_parallel_size or self.tensor_model_parallel_size
        if self.moe_ffn_hidden_size % etp:
            _fail(
                "moe_ffn_hidden_size",
                f"{self.moe_ffn_hidden_size} is not divisible by expert_tensor_parallel_size={etp}",
            )


def _flex_backend_available() -> bool:
    for module in ("deep_ep", "hybrid_ep_cpp"):
        try:
            __import__(module)
            return True
        except ImportError:
            pass
    return False

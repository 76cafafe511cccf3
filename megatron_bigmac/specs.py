"""Layer specs: what users pass to megatron-core's GPTModel (or Megatron-LM's --spec).

    config = BigMacConfig(..., moe_structure="bigmac")
    model = GPTModel(config=config, transformer_layer_spec=get_moe_gpt_layer_spec(config), ...)

Every transformer layer is attention + an MoE layer of `config.moe_structure`; only megatron-core
and PyTorch modules are used (no transformer-engine needed): megatron-core's local attention
projections and norms, SDPA core attention and a QKV projection with its bias in the GEMM
epilogue (megatron_bigmac.attention), GroupedExperts, and BigMacMoELayer for BigMac.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megatron_bigmac.attention import QKVLinear, SDPAttention
from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.loss import vocab_parallel_cross_entropy
from megatron_bigmac.moe import BigMacMoELayer, GroupedExperts, GroupedMoELayer, TopKRouter
from megatron_bigmac.norm import FusedNorm


def get_moe_module_spec(
    structure: str, pg_collection: Optional[ProcessGroupCollection] = None
) -> ModuleSpec:
    """The MoE layer of one structure: BigMac adds the descend/ascend projections around
    megatron-core's dispatch/experts/combine; Fine-Grained and Vanilla are GroupedMoELayer
    (megatron-core's MoELayer with grouped experts and the project's All-to-All dispatcher; they
    differ only in widths, set by the config).

    pg_collection: the process groups; None takes megatron-core's global parallel_state.
    megatron-core 0.16's TransformerLayer hands groups only to layers it recognises by identity
    (MoELayer itself), so these subclasses receive them through the spec's params.

    The router is megatron-core's TopKRouter with a tensor-core fp32 gating GEMM on GPUs
    (megatron_bigmac.moe.router)."""
    layer = BigMacMoELayer if structure == "bigmac" else GroupedMoELayer
    params = {} if pg_collection is None else {"pg_collection": pg_collection}
    return ModuleSpec(module=layer, params=params,
                      submodules=MoESubmodules(experts=GroupedExperts, router=TopKRouter))


def get_moe_gpt_layer_spec(
    config: BigMacConfig,
    attention: str = "sdpa",
    normalization: Optional[str] = None,
    pg_collection: Optional[ProcessGroupCollection] = None,
) -> ModuleSpec:
    """A GPT transformer layer whose MLP is an MoE layer of `config.moe_structure`.

    attention: "sdpa" (fused kernels via PyTorch) or "local" (megatron-core's unfused reference).
    """
    if attention not in ("sdpa", "local"):
        raise ValueError(f"attention: {attention!r} is not one of sdpa, local")
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        qk_layernorm=config.qk_layernorm,
        normalization=normalization or config.normalization,
    )
    self_attention = spec.submodules.self_attention
    if attention == "sdpa":
        self_attention = dataclasses.replace(
            self_attention,
            submodules=dataclasses.replace(self_attention.submodules, core_attention=SDPAttention,
                                           linear_qkv=QKVLinear),
        )
    submodules = dataclasses.replace(
        spec.submodules,
        self_attention=self_attention,
        mlp=get_moe_module_spec(config.moe_structure, pg_collection),
    )
    if config.layernorm_fusion:
        submodules = dataclasses.replace(
            submodules, input_layernorm=FusedNorm, pre_mlp_layernorm=FusedNorm
        )
    return dataclasses.replace(spec, submodules=submodules)


def get_moe_gpt_block_spec(
    config: BigMacConfig,
    attention: str = "sdpa",
    pg_collection: Optional[ProcessGroupCollection] = None,
) -> TransformerBlockSubmodules:
    """This pipeline stage's layers (get_moe_gpt_layer_spec each) and the final norm, FusedNorm
    with ``layernorm_fusion`` like the layers' own (megatron-core would pick its default)."""
    layer = get_moe_gpt_layer_spec(config, attention=attention, pg_collection=pg_collection)
    pp_rank = pg_collection.pp.rank() if pg_collection is not None else None
    num_layers = get_num_layers_to_build(config, pp_rank=pp_rank)
    final_norm = FusedNorm if config.layernorm_fusion else LayerNormImpl
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)


class BigMacGPTModel(GPTModel):
    """megatron-core's GPTModel whose language-model loss is megatron_bigmac.loss's vocab-parallel
    cross entropy (the same maths as megatron-core's unfused one, without fp32 copies of the
    logits). With ``cross_entropy_loss_fusion`` megatron-core's fused implementations are used."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        if self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        # [b, s] labels against [s, b, V/TP] logits; per-token losses back as [b, s].
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(),
                                            self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()


def build_gpt_model(
    config: BigMacConfig,
    vocab_size: int,
    max_sequence_length: int,
    attention: str = "sdpa",
    pg_collection: Optional[ProcessGroupCollection] = None,
    **gpt_kwargs,
) -> GPTModel:
    """GPTModel with every layer MoE (learned absolute positions and tied embeddings by default,
    as GPT-2/3 and the paper's parameter counts)."""
    gpt_kwargs.setdefault("position_embedding_type", "learned_absolute")
    gpt_kwargs.setdefault("share_embeddings_and_output_weights", True)
    return BigMacGPTModel(
        config=config,
        transformer_layer_spec=get_moe_gpt_block_spec(
            config, attention=attention, pg_collection=pg_collection
        ),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pg_collection=pg_collection,
        **gpt_kwargs,
    )

"""MoE layers: BigMac's low-dimension layer, the grouped experts shared by all structures, and
the All-to-All token dispatcher and router they use."""

from megatron_bigmac.moe.dispatcher import GatherAlltoAllTokenDispatcher
from megatron_bigmac.moe.experts import GroupedExperts
from megatron_bigmac.moe.layer import BigMacMoELayer, GroupedMoELayer, LatentProjection
from megatron_bigmac.moe.router import TopKRouter

__all__ = [
    "BigMacMoELayer",
    "GatherAlltoAllTokenDispatcher",
    "GroupedExperts",
    "GroupedMoELayer",
    "LatentProjection",
    "TopKRouter",
]

"""MoE layers: BigMac's low-dimension layer and the grouped experts shared by all structures."""

from megatron_bigmac.moe.experts import GroupedExperts
from megatron_bigmac.moe.layer import BigMacMoELayer, LatentProjection

__all__ = ["BigMacMoELayer", "GroupedExperts", "LatentProjection"]

"""The attention pieces of the path without transformer-engine:

SDPAttention: megatron-core's DotProductAttention computed by
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels), so the
TE-free path never materialises the [b, heads, s, s] score matrix.

QKVLinear: megatron-core's ColumnParallelLinear whose bias is added in the GEMM's epilogue when
nothing is parallel. megatron-core's linear adds it in a separate pass over the [s, b, 3h] output
(measured on one H100, small BigMac: ~5 ms per step, 2% of it).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """Drop-in `core_attention` for causal self-attention; anything else (padding or arbitrary
    masks, sliding windows, softmax offsets) falls back to megatron-core's own implementation."""

    def _sdpa_applies(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params):
        mask_type = attn_mask_type or self.attn_mask_type
        return (
            mask_type == AttnMaskType.causal
            and attention_bias is None
            and packed_seq_params is None
            and self.softmax_offset is None
            and self.scale_mask_softmax.window_size is None
        )

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if not self._sdpa_applies(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.attention_dropout.p if self.training else 0.0
        # Same RNG stream as megatron-core's attention dropout (per-TP-rank unless SP).
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0 and not self.config.sequence_parallel
            else _nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout_p,
                is_causal=q.size(2) > 1,
                # With apply_query_key_layer_scaling megatron-core divides softmax_scale by the
                # layer number and its softmax multiplies the scores back: one scale here.
                scale=self.softmax_scale * (self.scale_mask_softmax.scale or 1.0),
                enable_gqa=k.size(1) != q.size(1),
            )
        # [b, heads, s, d] -> [s, b, heads * d]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], self.hidden_size_per_partition)


class QKVLinear(ColumnParallelLinear):
    """ColumnParallelLinear; with one tensor-parallel rank (no all-reduce of the input gradient,
    no sequence parallelism), no fused gradient accumulation and no deferred weight gradients
    it is `F.linear`, which adds the bias in cuBLAS's epilogue (`addmm`). Same maths: autograd's
    linear backward is the matmuls and the bias sum of megatron-core's."""

    def _forward_impl(self, input, weight, bias=None, **kwargs):
        if (
            bias is not None
            and not kwargs.get("allreduce_dgrad")
            and not kwargs.get("sequence_parallel")
            and not kwargs.get("gradient_accumulation_fusion")
            and kwargs.get("grad_output_buffer") is None
        ):
            return F.linear(input, weight, bias)
        return super()._forward_impl(input, weight, bias, **kwargs)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False

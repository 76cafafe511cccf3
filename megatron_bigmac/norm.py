"""FusedNorm: megatron-core's `WrappedTorchNorm` (torch LayerNorm / RMSNorm) computed by
compiled kernels, the stand-in for transformer-engine's and apex's fused norms.

Same constructor as megatron-core's norm modules, same parameters (``weight``, ``bias``) and
checkpoint keys as torch.nn.LayerNorm / RMSNorm. Unlike `WrappedTorchNorm` it also works under
sequence parallelism: each TP rank normalizes its own sequence shard, so the weights' gradients
are all-reduced over TP (the ``sequence_parallel`` attribute, as in megatron-core's norms).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bigmac import kernels


class FusedNorm(torch.nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,  # apex's option; accepted for the common signature
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        super().__init__()
        self.normalization = config.normalization
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization: {self.normalization!r} is not LayerNorm or RMSNorm")
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma: not supported by FusedNorm")
        self.eps = eps
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, device=device))
            if self.normalization == "LayerNorm" else None
        )
        for param in (self.weight, self.bias):
            if param is not None:
                param.sequence_parallel = config.sequence_parallel
        self._layer_norm = kernels.compiled(kernels.layer_norm)
        self._rms_norm = kernels.compiled(kernels.rms_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "LayerNorm":
            return self._layer_norm(x, self.weight, self.bias, self.eps)
        return self._rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalization}, {self.weight.numel()}, eps={self.eps}"

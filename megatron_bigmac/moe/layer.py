"""BigMacMoELayer: megatron-core's MoELayer with BigMac's descend/ascend projections.

The forward is megatron-core's, stage by stage (Jin et al., 2025, "DCCA"):

    route(x)                 router on the FULL-width x  -> probs p(x), routing map   (stock)
    preprocess:   x' = x @ W_down                 h -> r*h, one per layer, no bias     (here)
    dispatch(x')             All-to-All / all-gather of r*h-wide tokens               (stock)
    experts:      E_i(x') = act(x' W_i,1) W_i,2    r*h -> h_f -> r*h, grouped GEMM     (GroupedExperts)
    combine:      y' = sum_i p_i(x) E_i(x')       gate-weighted, still r*h wide        (stock)
    postprocess:  y  = y' @ W_up                  r*h -> h, once on the weighted sum   (here)

This is the shape of megatron-core's own `moe_latent_size` path (`fc1_latent_proj`,
`fc2_latent_proj` in `preprocess`/`postprocess`, same parameter names, so checkpoints map), which
in 0.16 exists only with transformer-engine linears and experts. The projections here are plain
replicated linears; under sequence parallelism each TP rank projects its own sequence shard, so
their gradients are all-reduced over TP like the router's (`sequence_parallel` attribute).
Fine-Grained and Vanilla are GroupedMoELayer: megatron-core's MoELayer with GroupedExperts and,
for the All-to-All dispatcher, GatherAlltoAllTokenDispatcher (sync-free permutation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.utils import init_method_normal

from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.moe.dispatcher import GatherAlltoAllTokenDispatcher


class LatentProjection(MegatronModule):
    """A bias-free linear replicated on every TP rank (megatron's "duplicated" parallel mode).

    Returns ``(output, None)`` like megatron-core linears."""

    def __init__(self, input_size: int, output_size: int, config: BigMacConfig, init_method):
        super().__init__(config=config)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            with torch.no_grad():
                # Initialize in fp32 and cast, like megatron-core's CPU initialization.
                master = torch.empty(output_size, input_size, dtype=torch.float32, device=device)
                init_method(master)
                self.weight.copy_(master)
        # Each SP rank sees different tokens: all-reduce this grad over TP (finalize_model_grads).
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None


class GroupedMoELayer(MoELayer):
    """megatron-core's MoELayer; with ``moe_token_dispatcher_type: alltoall`` its dispatcher is
    GatherAlltoAllTokenDispatcher (same interface and results, no host syncs or atomics in the
    permutation). Fine-Grained and Vanilla layers are this class."""

    def __init__(
        self,
        config: BigMacConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        if config.moe_token_dispatcher_type == "alltoall":
            self.token_dispatcher = GatherAlltoAllTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
            )


class BigMacMoELayer(GroupedMoELayer):
    """MoELayer whose dispatch, experts and combine run at width r*h (see module docstring)."""

    def __init__(
        self,
        config: BigMacConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config, submodules, layer_number, pg_collection)
        h, latent = config.hidden_size, config.moe_latent_dim
        assert latent is not None, "BigMacMoELayer needs moe_structure='bigmac'"
        # W_down (descend) and W_up (ascend), named as megatron-core's latent MoE names them.
        if config.moe_latent_init == "variance_preserving":  # see BigMacConfig.moe_latent_init
            down_init, up_init = init_method_normal(h**-0.5), init_method_normal(latent**-0.5)
        else:
            down_init, up_init = config.init_method, config.output_layer_init_method
        self.fc1_latent_proj = LatentProjection(h, latent, config, down_init)
        self.fc2_latent_proj = LatentProjection(latent, h, config, up_init)

    def preprocess(self, hidden_states, probs, routing_map):
        """Descend h -> r*h after routing on the full width, before the dispatcher permutes."""
        latent, _ = self.fc1_latent_proj(hidden_states)
        return super().preprocess(latent, probs, routing_map)

    def postprocess(self, output, shared_expert_output):
        """Ascend r*h -> h once, on the gate-weighted sum the dispatcher has combined."""
        output = self.token_dispatcher.combine_postprocess(output)
        output, _ = self.fc2_latent_proj(output)
        if shared_expert_output is not None:
            output = output + shared_expert_output
        return output

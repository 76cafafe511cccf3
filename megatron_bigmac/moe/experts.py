"""GroupedExperts: all local experts of an MoE layer as two grouped GEMMs (no Python loop).

Each expert i is a non-gated MLP  E_i(t) = act(t @ W1_i^T) @ W2_i^T  (swiglu optional), where
the token width d is h (Fine-Grained, Vanilla) or r*h (BigMac). Weights are stored per expert in
nn.Linear layout, [out, in], stacked over local experts:

    weight1: [num_local_experts, G, f_local, d]   G = 2 for swiglu (gate, up), else 1
    weight2: [num_local_experts, d, f_local]

f_local = h_f / expert-TP size: fc1 is split on its output, fc2 on its input, and megatron-core's
dispatchers reduce-scatter the partial fc2 outputs over the expert-TP group.

The grouped GEMM is `torch._grouped_mm` (CPU fp32/bf16, Hopper bf16); where it is unavailable or
the shapes are not 16-byte aligned it falls back to one matmul per expert, with the same maths.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.kernels import activate_and_scale_rows, compiled, scale_rows


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "squared_relu": squared_relu, "swiglu": swiglu}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s backward
    rejects the stride-0 gradients that `sum()` and `expand()` produce."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # _grouped_mm needs every row stride to be a multiple of 16 bytes.
    if any((n * x.element_size()) % 16 for n in weight.shape[-2:]):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y[rows of group i] = x[rows of group i] @ weight[i]^T.

    x: [T, in], rows sorted by group; weight: [groups, out, in]; counts: [groups] rows per group.
    """
    if _grouped_mm_supported(x, weight):
        offsets = torch.cumsum(counts, 0).to(device=x.device, dtype=torch.int32, non_blocking=True)
        return _ContiguousGrad.apply(
            torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
        )
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ w.t() for chunk, w in zip(chunks, weight)])


def expert_mlp(tokens: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor,
               weight1: torch.Tensor, weight2: torch.Tensor, activation: Callable,
               probs_on_input: bool) -> torch.Tensor:
    """The local experts on their rows: ``p * activation(x @ W1_i^T) @ W2_i^T`` for the rows of
    each expert i, sorted by expert (``counts`` rows each), p the rows' gate weights (fp32).

    weight1: [experts, G, f_local, d]; weight2: [experts, d, f_local].
    """
    if probs_on_input:
        tokens = (probs.unsqueeze(-1) * tokens).to(tokens.dtype)
        probs = torch.ones_like(probs)
    hidden = grouped_linear(tokens, weight1.flatten(1, 2), counts)
    # The second matrix is linear and bias-free, so the gate weights may scale its input
    # (megatron-core's choice) or its output: scale the narrower of the two, f_local wide
    # (Fine-Grained) or d = r*h wide (BigMac, 4x fewer elements), in fp32 like the router's
    # probabilities.
    if weight2.shape[-1] <= weight2.shape[-2]:
        hidden = activate_and_scale_rows(hidden, probs, activation)
        return grouped_linear(hidden, weight2, counts)
    return scale_rows(grouped_linear(activation(hidden), weight2, counts), probs)


class GroupedExperts(MegatronModule):
    """The local experts of one MoE layer, megatron-core's experts interface:
    ``forward(permuted_tokens, tokens_per_expert, permuted_probs) -> (output, None)``."""

    def __init__(
        self,
        num_local_experts: int,
        config: BigMacConfig,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.activation = ACTIVATIONS[config.moe_expert_activation]
        # With moe_activation_fusion the whole expert MLP is compiled (one function shared by all
        # layers): its activation, gate weighting and casts become one kernel each way around the
        # grouped GEMMs. Symbolic sizes, since the number of rows varies from step to step under
        # expert parallelism.
        self._expert_mlp = compiled(expert_mlp, dynamic=True) if config.moe_activation_fusion \
            else expert_mlp
        self.num_fc1_chunks = 2 if config.moe_expert_activation == "swiglu" else 1

        self.token_width = config.moe_token_width
        self.ffn_size = config.moe_ffn_hidden_size
        tp_size = self.tp_group.size()
        assert self.ffn_size % tp_size == 0, "moe_ffn_hidden_size must divide by expert TP size"
        self.ffn_size_per_partition = self.ffn_size // tp_size

        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(
            torch.empty(
                num_local_experts,
                self.num_fc1_chunks,
                self.ffn_size_per_partition,
                self.token_width,
                dtype=config.params_dtype,
                device=device,
            )
        )
        self.weight2 = torch.nn.Parameter(
            torch.empty(
                num_local_experts,
                self.token_width,
                self.ffn_size_per_partition,
                dtype=config.params_dtype,
                device=device,
            )
        )
        if config.perform_initialization:
            self._initialize(self.weight1, config.init_method, tp_axis=2)
            self._initialize(self.weight2, config.output_layer_init_method, tp_axis=2)
        for weight in (self.weight1, self.weight2):
            # Expert weights are reduced over the expert-data-parallel group, which is the set of
            # ranks holding this same shard whatever EP/ETP/TP/DP are.
            weight.allreduce = False
            # The expert optimizer sums its grad norm over the expert TP x PP group, whose ranks
            # hold distinct shards, but skips unmarked weights on dense-TP ranks other than 0:
            # marked as megatron-core marks its experts, each rank counts its own shard (unmarked,
            # the norm that clipping uses was wrong under TP > 1).
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=2, stride=1)

    # ------------------------------------------------------------------ init
    def _shard_slices(self, tp_axis: int, shape) -> tuple:
        ep_rank, tp_rank = self.ep_group.rank(), self.tp_group.rank()
        local = [slice(None)] * len(shape)
        local[0] = slice(ep_rank * shape[0], (ep_rank + 1) * shape[0])
        local[tp_axis] = slice(tp_rank * shape[tp_axis], (tp_rank + 1) * shape[tp_axis])
        return tuple(local)

    @torch.no_grad()
    def _initialize(self, weight: torch.Tensor, init_method, tp_axis: int) -> None:
        if self.config.use_cpu_initialization:
            # Draw the global [num_experts, ...] tensor from the (rank-identical) CPU RNG and keep
            # this rank's shard, so the model is the same whatever the EP/ETP layout.
            global_shape = list(weight.shape)
            global_shape[0] *= self.ep_group.size()
            global_shape[tp_axis] *= self.tp_group.size()
            master = torch.empty(global_shape, dtype=torch.float32, device=weight.device)
            init_method(master)
            weight.copy_(master[self._shard_slices(tp_axis, weight.shape)])
        else:
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                init_method(weight)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        permuted_tokens: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        output = self._expert_mlp(
            permuted_tokens, tokens_per_expert.to(torch.long), permuted_probs, self.weight1,
            self.weight2, self.activation, self.config.moe_apply_probs_on_input,
        )
        return output, None

    # ------------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Global tensors [num_experts, ...] sharded over EP (axis 0) and expert TP (f axis)."""
        prepend = len(sharded_offsets)
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        replica_id = (0, 0, self.dp_group.rank())
        state = {}
        for name, tp_axis in (("weight1", 2), ("weight2", 2)):
            key = f"{prefix}{name}"
            state[key] = ShardedTensor.from_rank_offsets(
                key,
                getattr(self, name),
                *sharded_offsets,
                (prepend, ep_rank, ep_size),
                (prepend + tp_axis, tp_rank, tp_size),
                replica_id=replica_id,
                prepend_axis_num=prepend,
            )
        return state

    def backward_dw(self):
        """megatron-core calls this for delayed weight-gradient schedules; nothing is delayed."""

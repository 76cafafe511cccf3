"""The model: BigMacConfig from the run config, the project's GPTModel (every layer MoE), and
megatron-core's DistributedDataParallel around it."""

from __future__ import annotations

import re
from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import Float16Module

from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.data.tokenizer import tokenizer_vocab_size
from megatron_bigmac.specs import build_gpt_model
from megatron_bigmac.training.config import KEYS, ConfigError, TrainingConfig

#: Run-config keys whose name differs from the BigMacConfig / TransformerConfig field.
_RENAMED = {"num_experts": "num_moe_experts"}

#: Run-config keys passed to BigMacConfig unchanged.
_MODEL_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "hidden_dropout", "attention_dropout",
    "init_method_std", "normalization", "add_bias_linear", "num_experts", "moe_router_topk",
    "moe_ffn_hidden_size", "moe_aux_loss_coeff", "moe_router_load_balancing_type",
    "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity", "moe_token_dispatcher_type",
    "moe_router_pre_softmax", "moe_router_dtype", "moe_z_loss_coeff", "moe_structure",
    "moe_low_rank_ratio", "moe_latent_init", "moe_expert_activation", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
    "sequence_parallel", "bf16", "use_cpu_initialization", "bias_dropout_fusion",
    "cross_entropy_loss_fusion", "cross_entropy_fusion_impl", "layernorm_fusion",
    "moe_activation_fusion",
)


def model_config(cfg: TrainingConfig, meta: bool = False) -> BigMacConfig:
    """BigMacConfig for ``cfg``. ``meta``: skip weight initialization (for the meta device and for
    validation). Errors come back as ConfigError naming the run-config key."""
    kwargs = {_RENAMED.get(k, k): getattr(cfg, k) for k in _MODEL_KEYS}
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    kwargs.update(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        perform_initialization=not meta,
        use_cpu_initialization=bool(cfg.use_cpu_initialization) or meta,
        # Dropless MoE without transformer-engine: megatron-core's own kernels are enough.
        moe_grouped_gemm=False,
    )
    try:
        return BigMacConfig(**kwargs)
    except (ValueError, AssertionError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        field, sep, rest = message.partition(": ")
        inverse = {v: k for k, v in _RENAMED.items()}
        if sep and (field in kwargs or field in inverse):
            raise ConfigError(f"{inverse.get(field, field)}: {rest}") from None
        raise ConfigError(f"{_key_named_in(message)}: {message}") from None


#: megatron-core messages that name no flag, and the run-config key they are about.
_MESSAGE_KEYS = {"Bias in Moe is only supported when ETP==1": "add_bias_linear"}


def _key_named_in(message: str) -> str:
    """The run-config key a megatron-core error is about: the first Megatron-LM flag it names
    (--moe-router-pre-softmax -> moe_router_pre_softmax) that is a key, else 'model'."""
    for flag in re.findall(r"--([a-z0-9-]+)", message):
        if flag.replace("-", "_") in KEYS:
            return flag.replace("-", "_")
    return next((key for text, key in _MESSAGE_KEYS.items() if text in message), "model")


def padded_vocab_size(cfg: TrainingConfig, vocab_size: Optional[int] = None) -> int:
    """Megatron-LM's padding of the vocabulary (default: the tokenizer's, from ``tokenizer_dir``):
    a multiple of make_vocab_size_divisible_by x TP (GPT-2's 50,257 -> 50,304)."""
    if vocab_size is None:
        vocab_size = tokenizer_vocab_size(cfg.tokenizer_dir)
    multiple = cfg.make_vocab_size_divisible_by * cfg.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def build_gpt(cfg: TrainingConfig, pg_collection: ProcessGroupCollection | None = None,
              meta: bool = False) -> GPTModel:
    """The bare GPTModel (no DDP). With ``meta`` no weights are initialized: build it under
    ``torch.device("meta")`` to count parameters of models that do not fit."""
    config = model_config(cfg, meta=meta)
    return build_gpt_model(
        config,
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.max_position_embeddings,
        attention=cfg.attention,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        pg_collection=pg_collection,
    )


def build_model(cfg: TrainingConfig, device: torch.device,
                pg_collection: ProcessGroupCollection) -> DistributedDataParallel:
    """GPTModel on ``device``, cast to bf16 if asked (megatron-core's Float16Module), inside
    megatron-core's DistributedDataParallel (fp32 gradient buffers, reduced over DP; expert
    gradients over the expert-DP group).

    Call after seeding: with use_cpu_initialization every rank draws the same global weights, so
    data-parallel replicas start equal and the model does not depend on the layout.
    """
    model = build_gpt(cfg, pg_collection).to(device)
    config = model.config
    if cfg.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        overlap_param_gather=cfg.overlap_param_gather,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    return DistributedDataParallel(config, ddp_config, model, pg_collection=pg_collection)


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model

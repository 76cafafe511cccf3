"""Optimizer and learning-rate schedule: megatron-core's get_megatron_optimizer (Adam with fp32
main weights under bf16, the distributed optimizer on GPUs, separate dense and expert groups)
and OptimizerParamScheduler (linear warmup, then cosine/linear decay to min_lr)."""

from __future__ import annotations

from typing import List

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_bigmac.training.config import TrainingConfig


def build_optimizer(cfg: TrainingConfig, model_chunks: List[torch.nn.Module],
                    pg_collection: ProcessGroupCollection | None = None) -> MegatronOptimizer:
    """Megatron-core's optimizer over the DDP-wrapped model chunks. Gradient clipping at
    ``clip_grad`` (global norm over all ranks) happens inside ``optimizer.step()``."""
    config = OptimizerConfig(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        sgd_momentum=cfg.sgd_momentum,
        clip_grad=cfg.clip_grad,
        bf16=cfg.bf16,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        overlap_param_gather=cfg.overlap_param_gather,
    )
    # With an explicit pg_collection megatron-core takes no gloo groups (only the
    # distributed optimizer's legacy checkpoint format needs them).
    optimizer = get_megatron_optimizer(
        config, model_chunks, use_gloo_process_groups=pg_collection is None,
        pg_collection=pg_collection,
    )
    _use_fused_torch_adam(optimizer)
    return optimizer


def _use_fused_torch_adam(optimizer: MegatronOptimizer) -> None:
    """Without transformer-engine or apex megatron-core builds torch's Adam/AdamW with its
    default 'foreach' implementation, a few kernels per list of tensors per step; torch's
    'fused' one updates each parameter in one kernel (same maths; the step count moves to the
    parameter's device). Set before the first step, so no optimizer state exists yet."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam) or inner.state:
            continue  # TE/apex FusedAdam, SGD, or (never here) an optimizer that has stepped
        params = [p for group in inner.param_groups for p in group["params"]]
        if any(p.device.type not in ("cuda", "cpu") or p.dtype != torch.float32 for p in params):
            continue
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)
        inner._step_supports_amp_scaling = True


def build_scheduler(cfg: TrainingConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Per-iteration schedule (``step(increment=1)`` once per optimizer step): warmup from
    ``lr_warmup_init`` to ``lr`` over ``lr_warmup_iters``, then ``lr_decay_style`` down to
    ``min_lr`` at ``lr_decay_iters``; constant weight decay."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.lr_warmup_init,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=cfg.lr_decay_iters,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant",
        # Resuming restores the checkpoint's schedule; a config that disagrees is an error there.
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )

"""Checkpoints with megatron-core dist_checkpointing: model, optimizer, LR schedule, RNG states,
data position (consumed samples) and the resolved config, so ``load`` resumes a run exactly.

Layout (Megatron-LM's)::

    <save>/config.yaml                          the resolved config of the run
    <save>/iter_0000100/                        one dist_checkpointing directory per save
    <save>/latest_checkpointed_iteration.txt    the newest complete one

A checkpoint is written to ``iter_NNNNNNN.tmp`` and renamed once every rank has finished, and the
tracker file is replaced atomically after that: a crash mid-save leaves a ``.tmp`` directory that
nothing loads, never a half checkpoint under a valid name. Model and optimizer tensors are stored
as global tensors, so a checkpoint loads under another TP/EP layout (RNG states, which are per
rank, are then left as seeded).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_bigmac.training.config import ConfigError, TrainingConfig
from megatron_bigmac.training.model import unwrap

TRACKER = "latest_checkpointed_iteration.txt"

#: Keys that define the model's shape: a checkpoint only loads into the same values.
SHAPE_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_experts", "moe_router_topk",
    "moe_structure", "moe_low_rank_ratio", "moe_ffn_hidden_size", "moe_expert_activation",
    "normalization", "add_bias_linear", "untie_embeddings_and_output_weights",
    "max_position_embeddings", "make_vocab_size_divisible_by",
)


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def find_checkpoint(path: str | Path) -> Optional[Path]:
    """The checkpoint directory ``path`` names: a save directory (its latest complete checkpoint)
    or an ``iter_NNNNNNN`` directory itself. None when a save directory holds none yet."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        return iteration_dir(path, int(tracker.read_text().strip()))
    return None


def save_config(cfg: TrainingConfig, directory: str | Path) -> None:
    """Write the resolved config as ``config.yaml`` (main rank only)."""
    os.makedirs(directory, exist_ok=True)
    path = Path(directory) / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, rank: int, world_size: int, is_loading: bool,
                   with_optimizer: bool = True, with_rng: bool = True) -> dict:
    """The sharded state dict of this rank. Model/optimizer tensors carry their global shape and
    this rank's offsets; RNG states are one object per rank."""
    state = {"model": unwrap(model).sharded_state_dict()}
    if with_optimizer:
        # The distributed optimizer saves its own shards (Megatron-LM's default format, no
        # communication). megatron-core 0.16.1's "fully_reshardable" cannot load torch Adam's
        # per-parameter "step" without transformer-engine/apex (KeyError 'step' in
        # _set_main_param_and_optimizer_states).
        metadata = {"distrib_optim_sharding_type": "dp_reshardable",
                    "chained_optim_avoid_prefix": True}
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading,
                                                          metadata=metadata)
    if with_rng:
        state["rng"] = ShardedObject("rng_state", _rng_state(), (world_size,), (rank,),
                                     replica_id=0)
    return state


def save_checkpoint(cfg: TrainingConfig, iteration: int, consumed_samples: int, model, optimizer,
                    scheduler) -> Path:
    """Save under ``cfg.save`` atomically (see module docstring); every rank must call this."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    final = iteration_dir(cfg.save, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a crashed save
        os.makedirs(tmp)
    dist.barrier()

    state = _sharded_state(model, optimizer, rank, world_size, is_loading=False)
    # Plain values are "common": rank 0 writes them once.
    state.update(
        iteration=iteration,
        consumed_samples=consumed_samples,
        scheduler=scheduler.state_dict(),
        world_size=world_size,
        config=cfg.to_dict(),
    )
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()

    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker = Path(cfg.save) / TRACKER
        tracker_tmp = tracker.with_suffix(".txt.tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, tracker)
    dist.barrier()
    return final


def check_compatible(saved: dict, cfg: TrainingConfig, where: Path) -> None:
    """A checkpoint only loads into a model of the same shape."""
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} differs from {saved[key]!r} in the "
                              f"checkpoint {where}")


def _fill_empty_distributed_optimizer_state(optimizer) -> None:
    """megatron-core 0.16.1 without transformer-engine/apex: DistributedOptimizer.state_dict()
    asserts that torch's Adam state holds one 'step' (optimizer/distrib_optimizer.py, state_dict),
    which is empty before the first step, so a fresh DistributedOptimizer cannot build the state
    dict to load into. Its own _init_optimizer_states_with_dummy_values (one zero-gradient step)
    fills it; everything that step touches is then overwritten by the checkpoint."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def load_checkpoint(cfg: TrainingConfig, model, optimizer, scheduler) -> Tuple[int, int]:
    """Restore from ``cfg.load``; returns (iteration, consumed_samples), (0, 0) when there is
    nothing to load yet (a fresh run whose ``load`` is its own empty ``save``)."""
    where = find_checkpoint(cfg.load) if cfg.load else None
    if where is None:
        if cfg.load and not Path(cfg.load).exists():
            raise FileNotFoundError(f"load: {cfg.load} does not exist")
        return 0, 0
    rank, world_size = dist.get_rank(), dist.get_world_size()
    common = dist_checkpointing.load_common_state_dict(str(where))
    check_compatible(common["config"], cfg, where)
    same_layout = common["world_size"] == world_size
    _fill_empty_distributed_optimizer_state(optimizer)
    state = _sharded_state(model, optimizer, rank, world_size, is_loading=True,
                           with_rng=same_layout)
    loaded = dist_checkpointing.load(state, str(where))

    unwrap(model).load_state_dict(loaded["model"], strict=True)
    with torch.no_grad():  # megatron-core 0.16.1 copies into leaf main params outside no_grad
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    elif rank == 0:
        print(f"[checkpoint] saved with {common['world_size']} processes, loading into "
              f"{world_size}: RNG states stay as seeded", flush=True)
    if rank == 0:
        print(f"[checkpoint] resumed from {where} at iteration {common['iteration']}", flush=True)
    return common["iteration"], common["consumed_samples"]


def load_model_weights(model, path: str | Path) -> dict:
    """Load only the model's weights (any layout) from a checkpoint; returns its saved config."""
    where = find_checkpoint(path)
    if where is None:
        raise FileNotFoundError(f"load: no checkpoint in {path}")
    common = dist_checkpointing.load_common_state_dict(str(where))
    state = {"model": unwrap(model).sharded_state_dict()}
    loaded = dist_checkpointing.load(state, str(where))
    unwrap(model).load_state_dict(loaded["model"], strict=True)
    return common

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

Resuming continues the saved run: its model shape, LR schedule, optimizer hyperparameters and data
order must match the config (``check_compatible``), which is checked before anything is built.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
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

#: Keys that fix how a resumed run continues: its data order (megatron-core's sample index comes
#: from seq_length, seed, split and the number of samples, which the checkpoint keeps as
#: ``train_samples``; consumed samples advance by global batches) and its optimization, which
#: resuming restores from the checkpoint whatever the config says (the LR and weight-decay
#: schedule through use_checkpoint_opt_param_scheduler, Adam's betas and eps through the
#: optimizer's param groups). A checkpoint only resumes with the same values.
SCHEDULE_KEYS = (
    "seq_length", "global_batch_size", "seed", "split", "optimizer", "lr", "min_lr",
    "lr_decay_style", "lr_warmup_iters", "lr_warmup_init", "lr_decay_iters", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_eps", "sgd_momentum",
)

#: Keys a resumed run may change on purpose, with effect (train_iters grows to extend a run, data
#: files move): a change is reported, not refused.
CHANGEABLE_KEYS = (
    "train_iters", "exit_interval", "exit_duration_in_mins", "data_path", "train_data_path",
    "mock_data", "clip_grad", "hidden_dropout", "attention_dropout", "moe_aux_loss_coeff",
    "moe_z_loss_coeff", "moe_expert_capacity_factor", "moe_router_pre_softmax",
    "moe_router_load_balancing_type", "eod_mask_loss",
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


def saved_train_samples(common: dict) -> int:
    """The size of the train dataset whose order the checkpoint's run read (older checkpoints:
    their config's train_iters x global_batch_size, what the runner built then)."""
    if "train_samples" in common:
        return common["train_samples"]
    return common["config"]["train_iters"] * common["config"]["global_batch_size"]


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings (relative, absolute, with ..) name the same directory."""
    return Path(a).resolve() == Path(b).resolve()


def save_config(cfg: TrainingConfig, directory: str | Path) -> None:
    """Write the resolved config as ``config.yaml`` (main rank only)."""
    os.makedirs(directory, exist_ok=True)
    path = Path(directory) / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def _rng_state() -> dict:
    # The tracker's streams are generators under CUDA graphs (cuda_graph_impl), state tensors
    # otherwise: saved as tensors, so a checkpoint resumes with or without graphs.
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {name: tensor_parallel.convert_cuda_rng_state(state, to_graphable=False)
                    for name, state in tracker.items()},
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    graphable = getattr(tracker, "use_cudagraphable_rng", False)
    tracker.set_states({name: tensor_parallel.convert_cuda_rng_state(s, to_graphable=graphable)
                        for name, s in state["tracker"].items()})


def _parallel_layout() -> dict:
    """The sizes that decide which part of the model and which RNG streams a rank holds
    (megatron-core orders the ranks the same way for the same sizes)."""
    return {
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


def _saved_layout(common: dict) -> dict:
    """The checkpoint's parallel layout. Checkpoints from before it was saved get it from their
    config and world size, the sizes megatron-core was built from (so their RNG states still
    restore under the same layout, and only then)."""
    if "parallel_layout" in common:
        return common["parallel_layout"]
    config, world_size = common["config"], common["world_size"]
    tp, pp = config["tensor_model_parallel_size"], config["pipeline_model_parallel_size"]
    return {
        "world_size": world_size,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": config["expert_model_parallel_size"],
        "expert_tensor_parallel_size": config["expert_tensor_parallel_size"] or tp,
        "data_parallel_size": world_size // (tp * pp),
    }


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


def save_checkpoint(cfg: TrainingConfig, iteration: int, consumed_samples: int, train_samples: int,
                    model, optimizer, scheduler) -> Path:
    """Save under ``cfg.save`` atomically (see module docstring); every rank must call this.
    ``train_samples``: the size of the train dataset the run reads (it fixes the data order)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    final = iteration_dir(cfg.save, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a crashed save
        os.makedirs(tmp)
    dist.barrier()

    # Saved before the first step (a signal during startup), the optimizer holds no state yet and
    # megatron-core cannot build its state dict; a fresh optimizer is the same one.
    state = _sharded_state(model, optimizer, rank, world_size, is_loading=False,
                           with_optimizer=iteration > 0)
    # Plain values are "common": rank 0 writes them once.
    state.update(
        iteration=iteration,
        consumed_samples=consumed_samples,
        train_samples=train_samples,
        scheduler=scheduler.state_dict(),
        world_size=world_size,
        parallel_layout=_parallel_layout(),
        config=cfg.to_dict(),
    )
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()

    if rank == 0:
        # Saving an iteration again (a run resumed from an older one into the same ``save``):
        # the old copy is renamed aside, not deleted first, so a crash never leaves the tracker
        # naming a missing directory for longer than one rename.
        old = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        tracker = Path(cfg.save) / TRACKER
        tracker_tmp = tracker.with_suffix(".txt.tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, tracker)
    dist.barrier()
    return final


def check_compatible(saved: dict, cfg: TrainingConfig, where: Path) -> List[str]:
    """A checkpoint only loads into a model of the same shape (SHAPE_KEYS) and resumes only its
    own run (SCHEDULE_KEYS): ConfigError naming every differing key, ``key: saved -> config``.
    Returns the CHANGEABLE_KEYS that differ, in the same form."""
    def changed(keys):
        return [f"{key}: {saved[key]!r} -> {getattr(cfg, key)!r}" for key in keys
                if key in saved and saved[key] != getattr(cfg, key)]

    refused = changed(SHAPE_KEYS + SCHEDULE_KEYS)
    if refused:
        raise ConfigError(f"{', '.join(refused)}: cannot resume from {where}, which keeps the "
                          f"saved model shape, LR schedule, optimizer and data order; set these "
                          f"keys to the checkpoint's values")
    return changed(CHANGEABLE_KEYS)


def checkpoint_to_resume(cfg: TrainingConfig) -> Optional[Tuple[Path, dict]]:
    """The checkpoint ``cfg.load`` names and its common state (iteration, config, ...), checked
    against ``cfg`` (``check_compatible``); None when there is nothing to load yet (a fresh run
    whose ``load`` is its own ``save``, still without a checkpoint). Reads files only, and runs
    before any process group exists: a mismatch stops the run at once, in one line.

    The optimizer's state is stored in the format of the optimizer that saved it (megatron-core's
    distributed optimizer shards it over data-parallel ranks), so ``use_distributed_optimizer``
    left to its default takes the checkpoint's value; set to the other value, it is refused."""
    if not cfg.load:
        return None
    where = find_checkpoint(cfg.load)
    if where is None:
        if cfg.save is not None and same_path(cfg.save, cfg.load):
            return None  # a fresh run's ``load`` may be its own ``save``
        if not Path(cfg.load).exists():
            raise FileNotFoundError(f"load: {cfg.load} does not exist")
        raise FileNotFoundError(f"load: no checkpoint in {cfg.load} (neither {TRACKER} nor an "
                                f"iter_NNNNNNN directory's metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(where))
    saved = common["config"]
    main_rank = os.environ.get("RANK", "0") == "0"
    distributed = saved.get("use_distributed_optimizer")
    if distributed is not None and distributed != cfg.use_distributed_optimizer:
        if not getattr(cfg, "_use_distributed_optimizer_defaulted", False):
            raise ConfigError(f"use_distributed_optimizer: {distributed} -> "
                              f"{cfg.use_distributed_optimizer}: cannot resume from {where}, whose "
                              f"optimizer state is in the other optimizer's format; set it to "
                              f"{str(distributed).lower()} or leave it unset")
        cfg.use_distributed_optimizer = distributed
        if main_rank:
            print(f"[checkpoint] use_distributed_optimizer: {distributed}, as {where} was saved",
                  flush=True)
    changed = check_compatible(saved, cfg, where)
    if changed and main_rank:
        print(f"[checkpoint] WARNING: resuming {where} with changed keys: {', '.join(changed)}",
              flush=True)
    return where, common


def load_checkpoint(resume: Optional[Tuple[Path, dict]], model, optimizer,
                    scheduler) -> Tuple[int, int]:
    """Restore the checkpoint ``checkpoint_to_resume`` found; returns (iteration,
    consumed_samples), (0, 0) when there is none."""
    if resume is None:
        return 0, 0
    where, common = resume
    rank, world_size = dist.get_rank(), dist.get_world_size()
    saved_layout, layout = _saved_layout(common), _parallel_layout()
    same_layout = saved_layout == layout
    with_optimizer = common["iteration"] > 0  # see save_checkpoint
    state = _sharded_state(model, optimizer, rank, world_size, is_loading=True,
                           with_optimizer=with_optimizer, with_rng=same_layout)
    loaded = dist_checkpointing.load(state, str(where))

    unwrap(model).load_state_dict(loaded["model"], strict=True)
    if with_optimizer:
        with torch.no_grad():  # megatron-core 0.16.1 copies into leaf main params outside no_grad
            optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    elif rank == 0:
        differences = ", ".join(f"{key} {saved_layout.get(key)} -> {size}"
                                for key, size in layout.items() if saved_layout.get(key) != size)
        print(f"[checkpoint] parallel layout differs from the checkpoint's ({differences}): "
              f"RNG states stay as seeded", flush=True)
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

"""Process groups and seeding: torch.distributed from torchrun's environment, then megatron-core's
TP/PP/EP groups (parallel_state), gathered into one ProcessGroupCollection for the pieces that
take one."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_bigmac.training.config import TrainingConfig


@dataclass
class ParallelContext:
    """What the rest of the runner needs to know about this process's place in the layout."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    pg_collection: ProcessGroupCollection
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainingConfig) -> ParallelContext:
    """torch.distributed (nccl on GPUs, gloo on CPU) and megatron-core's model-parallel groups.

    Launched by torchrun, RANK/WORLD_SIZE/LOCAL_RANK come from the environment; a plain
    ``python -m`` run is a world of one.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = cfg.distributed_backend
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Share the cores between the processes of this host (torchrun pins every one to 1).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    if not dist.is_initialized():
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend, rank=rank, world_size=world_size,
            timeout=timedelta(minutes=cfg.distributed_timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
        distributed_timeout_minutes=cfg.distributed_timeout_minutes,
    )
    return ParallelContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def set_seed(seed: int, cuda_graphs: bool = False) -> None:
    """Megatron-LM's seeding: the same seed on every data-parallel rank (so replicas start equal)
    and per-TP/EP-rank streams in megatron-core's RNG tracker (dropout inside TP regions, expert
    initialization on GPUs). ``cuda_graphs``: the tracker keeps its streams as generators a
    captured graph can advance (Megatron-LM's choice under --cuda-graph-impl local)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=cuda_graphs,
                                    force_reset_rng=cuda_graphs)


class ExitSignal:
    """Asks the run to checkpoint and stop at the next iteration boundary: SIGUSR1 / SIGTERM
    (``handle_signals``), or the wall-clock ``duration_s`` since construction running out
    (Megatron-LM's --exit-duration-in-mins: a time limit that needs no signal to arrive).

    Ranks see a signal or the clock at different moments, so they agree every iteration through
    one all-reduce on a gloo group of all ranks: a host-side collective that never waits for the
    GPU. ``reason`` says which one stopped the run.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, handle_signals: bool = True, duration_s: Optional[float] = None):
        self.received = False
        self.deadline = None if duration_s is None else time.monotonic() + duration_s
        self.reason = "exit signal"
        self.group = dist.new_group(backend="gloo")
        if handle_signals:
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True  # handling it twice is harmless

    def agreed(self) -> bool:
        """True on every rank once any rank has received a signal or passed the deadline
        (collective)."""
        late = self.deadline is not None and time.monotonic() > self.deadline
        flags = torch.tensor([int(self.received), int(late)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if not flags[0] and flags[1]:
            self.reason = "exit_duration_in_mins"
        return bool(flags.any())


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

"""Run a function in N spawned CPU processes over gloo (the test harness for parallel layouts)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo") -> None:
    """Spawn `world_size` processes running fn(rank, world_size, *args); a failure in any raises.
    gloo on CPU; pass backend="nccl" for GPU runs (one GPU per rank)."""
    mp.spawn(_worker, args=(world_size, free_port(), backend, fn, args), nprocs=world_size, join=True)

"""Helpers of the one-GPU benchmarks: megatron-core's process groups for one rank, and the
forward and backward times of one call with CUDA events."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist


def init_one_rank_model_parallel(port: int) -> None:
    """One NCCL rank with megatron-core's parallel state and RNG tracker, for building its
    modules (TP = EP = 1)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)


def forward_backward_ms(run: Callable[[], torch.Tensor], grad: torch.Tensor,
                        leaves: Sequence[torch.Tensor] = (), calls: int = 20, warmup: int = 3):
    """Mean milliseconds of ``y = run()`` and of ``y.backward(grad)`` over ``calls`` calls after
    ``warmup`` untimed ones (compilation, autotuning). ``leaves``' gradients are cleared before
    each call so that the last call's are fresh. Returns (forward_ms, backward_ms, last y)."""
    for _ in range(warmup):
        run().backward(grad)
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    forward = backward = 0.0
    for _ in range(calls):
        for leaf in leaves:
            leaf.grad = None
        events[0].record()
        y = run()
        events[1].record()
        y.backward(grad)
        events[2].record()
        torch.cuda.synchronize()
        forward += events[0].elapsed_time(events[1])
        backward += events[1].elapsed_time(events[2])
    return forward / calls, backward / calls, y

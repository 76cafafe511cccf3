"""Forward and backward times of one call with CUDA events, for the kernel micro-benchmarks."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


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

"""GroupedExperts forward + backward replayed as one CUDA graph (no host time), at the small configs'
shapes per layer and micro-batch (32 k tokens, bf16): without fusions, as configured (the runner's
default, moe_activation_fusion) and the whole module under torch.compile. Median of 5 x 20 replays.

    python benchmarks/expert_mlp_graphs.py > benchmarks/results/train_mfu/h100_expert_mlp_graphs_after.txt
"""

from __future__ import annotations

import torch

from expert_mlp import experts_module, routed_rows
from one_gpu import init_one_rank_model_parallel

VARIANTS = (("torch ops", False, False), ("as configured", True, False),
            ("torch.compile", False, True))  # label, moe_activation_fusion, whole-module compile


def replay_ms(step) -> list[float]:
    """Milliseconds per replay of ``step`` captured as one CUDA graph (after 3 eager warm-up
    calls on a side stream, as capture needs), 5 rounds of 20 replays, sorted."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 20)
    return sorted(times)


def main():
    init_one_rank_model_parallel(port=29535)
    print(torch.cuda.get_device_name(), torch.__version__)
    for structure in ("fine_grained", "bigmac"):
        first, counts, probs, tokens, grad = routed_rows(structure, tokens=32768, hidden=768)
        for label, fusion, whole in VARIANTS:
            module, _ = experts_module(structure, 768, fusion, like=first)
            forward = torch.compile(module) if whole else module
            x = tokens.clone().requires_grad_()
            times = replay_ms(lambda: forward(x, counts, probs)[0].backward(grad))
            print(f"{structure:13s} {label:14s} graph replay fwd+bwd {times[2]:.3f} ms "
                  f"(min {times[0]:.3f}, max {times[-1]:.3f})", flush=True)


if __name__ == "__main__":
    main()

"""GroupedExperts forward + backward replayed as one CUDA graph (no host time), at the small configs'
shapes per layer and micro-batch (32 k tokens, bf16): without fusions, as configured (the runner's
default, moe_activation_fusion) and the whole module under torch.compile. Median of 5 x 20 replays.

    python benchmarks/expert_mlp_graphs.py > benchmarks/results/train_mfu/h100_expert_mlp_graphs_after.txt
"""
# GroupedExperts fwd+bwd replayed as a CUDA graph: as configured vs whole-module torch.compile
# (does the eager benchmark's Fine-Grained gap survive without host time?).
import sys, torch
sys.path.insert(0, "benchmarks")
from one_gpu import init_one_rank_model_parallel
from expert_mlp import STRUCTURES, experts_module

init_one_rank_model_parallel(port=29535)
print(torch.cuda.get_device_name(), torch.__version__)
for structure in ("fine_grained", "bigmac"):
    experts, topk = STRUCTURES[structure]
    tokens = 32768; rows = tokens * topk
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.bincount(torch.randn(tokens, experts, device="cuda", generator=g).topk(topk, -1).indices.view(-1), minlength=experts)
    probs = torch.rand(rows, device="cuda", generator=g)
    first, config = experts_module(structure, 768, False)
    d = config.moe_token_width
    x0 = (0.5 * torch.randn(rows, d, device="cuda", generator=g)).bfloat16()
    grad = torch.randn(rows, d, device="cuda", generator=g).bfloat16()
    for label, fusion, compile_ in (("torch ops", False, False), ("as configured", True, False), ("torch.compile", False, True)):
        module, _ = experts_module(structure, 768, fusion)
        module.load_state_dict(first.state_dict())
        fwd = torch.compile(module) if compile_ else module
        x = x0.clone().requires_grad_()
        step = lambda: fwd(x, counts, probs)[0].backward(grad)
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                graph.replay()
            b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b) / 20)
        times.sort()
        print(f"{structure:13s} {label:14s} graph replay fwd+bwd {times[2]:.3f} ms (min {times[0]:.3f}, max {times[-1]:.3f})", flush=True)

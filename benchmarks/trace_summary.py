"""Where a training step's time goes, from a torch.profiler Chrome trace (the runner's
``profile: true`` writes one to <log_dir>/profile/rank0.trace.json).

    python benchmarks/trace_summary.py runs/x/profile/rank0.trace.json [--top 25]

Prints the traced wall time, how much of it the GPU was busy (the union of kernel intervals,
so overlapping streams are not double counted), the host-device synchronizations the CPU waited
in, and the kernels grouped by name with their share of the busy time. A GPU idle for a large
share of the wall time means the step is bound by the host (Python, kernel launches, syncs).

It also splits the kernel time into matrix multiplications and attention (cuBLAS/cuBLASLt,
CUTLASS incl. torch's grouped GEMM, cuDNN/flash attention: the work that model FLOPs count) and
everything else (routing, permutation, norms, activations, casts, loss, optimizer). With
``--flops-per-step F --steps N`` it prints the MFU ceiling those matmul kernels allow: the MFU if
a step took only their time, nothing else running and the GPU never idle.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def _union_length(intervals) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _short(name: str) -> str:
    # Templated CUDA kernel names are long; the part before the first '<' or '(' names them.
    return re.split(r"[<(]", name, maxsplit=1)[0][:90] or name[:90]


# Kernel names of matrix multiplications and attention on Hopper without transformer-engine:
# cuBLAS(Lt) "nvjet"/"xmma"/"gemm", CUTLASS (torch._grouped_mm's sm90 kernels), cuDNN's SDPA.
MATMUL_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublasLt|sdpa|flash|fmha", re.IGNORECASE)
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16

MODULE_PREFIX = "module: "  # megatron_bigmac.training.metrics.ModuleRanges
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


def _innermost_at(intervals, points):
    """For each (time, key) in ``points``, the innermost of the nested ``intervals``
    (start, end, label) containing that time (None if none); one sweep over both."""
    intervals = sorted(intervals, key=lambda iv: (iv[0], -iv[1]))
    found, stack, i = {}, [], 0
    for time, key in sorted(points):
        while i < len(intervals) and intervals[i][0] <= time:
            while stack and stack[-1][1] < intervals[i][0]:
                stack.pop()
            stack.append(intervals[i])
            i += 1
        while stack and stack[-1][1] < time:
            stack.pop()
        found[key] = stack[-1][2] if stack else None
    return found


def module_times(events, by_kernel: bool = False) -> dict:
    """GPU time per module and direction ("GroupedExperts bwd"), with the runner's profile
    (ModuleRanges): a kernel belongs to the host operator that launched it; a forward operator
    to the innermost module range around it; a backward one (autograd's evaluate_function) to
    the module of the forward operator with the same sequence number. Kernels outside any
    module are labelled by their innermost host range (the optimizer step, gradient hooks).
    ``by_kernel``: keys are (module, kernel name) instead, to see which kernels a module runs."""
    by_tid = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            by_tid[e["tid"]].append(e)
    # Forward operators -> module, keyed by sequence number.
    seq_module = {}
    for tid, ops in by_tid.items():
        modules = [(e["ts"], e["ts"] + e["dur"], e["name"][len(MODULE_PREFIX):])
                   for e in ops if e["name"].startswith(MODULE_PREFIX)]
        forward = [e for e in ops if "Sequence number" in e.get("args", {})
                   and not e["name"].startswith(BACKWARD_PREFIX)]
        inner = _innermost_at(modules, [(e["ts"], i) for i, e in enumerate(forward)])
        for i, e in enumerate(forward):
            if inner[i] is not None:
                seq_module.setdefault(e["args"]["Sequence number"], inner[i])

    def label(e):
        name, args = e["name"], e.get("args", {})
        if name.startswith(MODULE_PREFIX):
            return name[len(MODULE_PREFIX):] + " fwd"
        if name.startswith(BACKWARD_PREFIX):
            module = seq_module.get(args.get("Sequence number"))
            return f"{module} bwd" if module else name[len(BACKWARD_PREFIX):]
        return name

    # Each kernel's launch (correlation id; cuBLASLt and cuDNN launch through the driver API)
    # -> the innermost labelled host range around it.
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    points = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            launch = launches.get(e.get("args", {}).get("correlation"))
            if launch is not None:
                points[launch["tid"]].append((launch["ts"], id(e)))
    times = defaultdict(float)
    kernels = {id(e): e for e in events if e.get("cat") == "kernel"}
    for tid, pts in points.items():
        ranges = [(e["ts"], e["ts"] + e["dur"], label(e)) for e in by_tid[tid]
                  if e["name"].startswith((MODULE_PREFIX, BACKWARD_PREFIX))
                  or e.get("cat") == "user_annotation"]
        for key, where in _innermost_at(ranges, pts).items():
            where = where or "other"
            times[(where, _short(kernels[key]["name"])) if by_kernel else where] += kernels[key]["dur"]
    unattributed = sum(e["dur"] for e in kernels.values()) - sum(times.values())
    if unattributed > 0 and not by_kernel:
        times["(launched outside the trace)"] += unattributed
    return {k: v / 1e3 for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def summarize(path: str, top: int = 25) -> dict:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy",
                                                                           "gpu_memset")]
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]
    cpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    host = [(e["ts"], e["ts"] + e["dur"]) for e in cpu_ops]
    everything = spans + host
    wall = (max(s for _, s in everything) - min(s for s, _ in everything)) if everything else 0.0
    busy = _union_length(spans)

    by_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        entry = by_name[_short(e["name"])]
        entry[0] += e["dur"]
        entry[1] += 1
    matmul_us = sum(e["dur"] for e in kernels if MATMUL_KERNEL.search(e["name"]))
    syncs = defaultdict(lambda: [0.0, 0])
    for e in runtime:
        if "Synchronize" in e["name"] or e["name"] in ("cudaMemcpy", "cudaMemcpyAsync"):
            entry = syncs[e["name"]]
            entry[0] += e["dur"]
            entry[1] += 1
    return {
        "wall_ms": wall / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "kernel_sum_ms": sum(e["dur"] for e in kernels) / 1e3,
        "kernel_launches": len(kernels),
        "matmul_kernel_ms": matmul_us / 1e3,
        "syncs": {k: {"ms": v[0] / 1e3, "calls": v[1]} for k, v in syncs.items()},
        "kernels": [
            {"name": name, "ms": v[0] / 1e3, "calls": v[1]}
            for name, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "modules_ms": dict(list(module_times(events).items())[:top]),
        "module_kernels_ms": [
            {"module": module, "kernel": kernel, "ms": ms}
            for (module, kernel), ms in list(module_times(events, by_kernel=True).items())[:4 * top]
        ],
    }


def mfu_ceiling(summary: dict, flops_per_step: float, steps: int,
                peak: float = PEAK_BF16_FLOPS) -> dict:
    """The MFU a step would reach if only its matmul/attention kernels ran, back to back; and
    where the rest of a traced step goes, per step."""
    matmul = summary["matmul_kernel_ms"] / steps
    return {
        "mfu_ceiling": flops_per_step / (matmul / 1e3) / peak,
        "matmul_ms_per_step": matmul,
        "other_kernel_ms_per_step": (summary["kernel_sum_ms"] - summary["matmul_kernel_ms"]) / steps,
        "idle_ms_per_step": (summary["wall_ms"] - summary["gpu_busy_ms"]) / steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="also write the summary here")
    p.add_argument("--flops-per-step", type=float,
                   help="model FLOPs of one step (e.g. the runner's log: tflops_per_gpu x step_time_s)")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (default 1)")
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    s = summarize(args.trace, args.top)
    if args.flops_per_step:
        s.update(mfu_ceiling(s, args.flops_per_step, args.steps))
    print(f"traced wall {s['wall_ms']:.1f} ms | GPU busy {s['gpu_busy_ms']:.1f} ms "
          f"({100 * s['gpu_busy_ms'] / max(s['wall_ms'], 1e-9):.0f}%) | "
          f"{s['kernel_launches']} kernels")
    for name, v in s["syncs"].items():
        print(f"  host waits: {name}: {v['calls']} calls, {v['ms']:.1f} ms")
    busy = max(s["kernel_sum_ms"], 1e-9)
    other = s["kernel_sum_ms"] - s["matmul_kernel_ms"]
    print(f"  matmul + attention kernels {s['matmul_kernel_ms']:.1f} ms "
          f"({100 * s['matmul_kernel_ms'] / busy:.0f}%), everything else {other:.1f} ms")
    if "mfu_ceiling" in s:
        print(f"  MFU ceiling at these matmul kernel times: {100 * s['mfu_ceiling']:.1f}% "
              f"(per step: matmul {s['matmul_ms_per_step']:.1f} ms, other kernels "
              f"{s['other_kernel_ms_per_step']:.1f} ms, GPU idle {s['idle_ms_per_step']:.1f} ms)")
    for k in s["kernels"]:
        print(f"  {k['ms']:9.2f} ms {100 * k['ms'] / busy:5.1f}% {k['calls']:6d}x  {k['name']}")
    print("  GPU time by module (forward / backward):")
    for name, ms in s["modules_ms"].items():
        print(f"  {ms:9.2f} ms {100 * ms / busy:5.1f}%  {name}")
    print("  the largest (module, kernel) pairs:")
    for row in s["module_kernels_ms"][:args.top]:
        print(f"  {row['ms']:9.2f} ms {100 * row['ms'] / busy:5.1f}%  {row['module']:32s} {row['kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()

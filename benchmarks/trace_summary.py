"""Where a training step's time goes, from a torch.profiler Chrome trace (the runner's
``profile: true`` writes one to <log_dir>/profile/rank0.trace.json).

    python benchmarks/trace_summary.py runs/x/profile/rank0.trace.json [--top 25]

Prints the traced wall time, how much of it the GPU was busy (the union of kernel intervals,
so overlapping streams are not double counted), the host-device synchronizations the CPU waited
in, and the kernels grouped by name with their share of the busy time. A GPU idle for a large
share of the wall time means the step is bound by the host (Python, kernel launches, syncs).
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
        "syncs": {k: {"ms": v[0] / 1e3, "calls": v[1]} for k, v in syncs.items()},
        "kernels": [
            {"name": name, "ms": v[0] / 1e3, "calls": v[1]}
            for name, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args()
    s = summarize(args.trace, args.top)
    print(f"traced wall {s['wall_ms']:.1f} ms | GPU busy {s['gpu_busy_ms']:.1f} ms "
          f"({100 * s['gpu_busy_ms'] / max(s['wall_ms'], 1e-9):.0f}%) | "
          f"{s['kernel_launches']} kernels")
    for name, v in s["syncs"].items():
        print(f"  host waits: {name}: {v['calls']} calls, {v['ms']:.1f} ms")
    busy = max(s["kernel_sum_ms"], 1e-9)
    for k in s["kernels"]:
        print(f"  {k['ms']:9.2f} ms {100 * k['ms'] / busy:5.1f}% {k['calls']:6d}x  {k['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()

"""Tables, a bar chart and a projection to the paper's cluster from moe_speed.py results.

    python benchmarks/summarize_speed.py benchmarks/results/h200x2 --png docs/benchmarks_speed.png

Projection (printed and written into the Markdown): the paper's speed cluster is 4 nodes x 8
PCIe GPUs with one 100 Gb/s InfiniBand NIC per node, EP = 32. For each structure we take the
measured EP=1 step time of the same model on one GPU (no communication at all) as its compute
time, optionally scaled by --compute-scale for slower GPUs, and add the All-to-All time of the
analytic bytes (megatron_bigmac.costs convention: dispatch + combine, forward + backward, every
layer) that cross the node's NIC: 24/31 of each GPU's traffic leaves the node, and the NIC is
shared by 8 GPUs (100 Gb/s / 8 = 1.5625 GB/s per GPU). Assumptions stated there: no overlap of
communication with compute, intra-node PCIe traffic and the data-parallel all-reduce ignored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = ("stock", "fine_grained", "bigmac", "vanilla")


def load(results_dir: Path) -> dict:
    runs = {}
    for path in sorted(results_dir.glob("speed_*.json")):
        runs[path.stem.removeprefix("speed_")] = json.loads(path.read_text())
    return runs


def training_table(runs: dict) -> str:
    lines = ["| run | " + " | ".join(f"{v} ms/step" for v in VARIANTS)
             + " | BigMac vs stock | BigMac vs Fine-Grained |", "|---" * 7 + "|"]
    for name, run in runs.items():
        r = run["results"]
        big = r["bigmac"]["step_ms_median"]
        lines.append(f"| {name} | " + " | ".join(f"{r[v]['step_ms_median']:.1f}" for v in VARIANTS)
                     + f" | {r['stock']['step_ms_median'] / big:.2f}x"
                     + f" | {r['fine_grained']['step_ms_median'] / big:.2f}x |")
    return "\n".join(lines)


def breakdown_table(runs: dict) -> str:
    lines = ["| run | variant | fwd dispatch ms | fwd experts ms | fwd combine ms | NCCL kernels ms/step | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for v in VARIANTS:
            r = run["results"][v]
            if "fwd_dispatch_ms" not in r:
                continue
            lines.append(f"| {name} | {v} | {r['fwd_dispatch_ms']:.1f} | "
                         f"{r['fwd_routed_experts_compute_ms']:.1f} | {r['fwd_combine_ms']:.1f} | "
                         f"{r['comm_kernel_ms']:.1f} | {r['peak_memory_gib']:.1f} |")
    return "\n".join(lines)


def inference_table(runs: dict) -> str:
    lines = ["| run | batch | " + " | ".join(f"{v} prefill tok/s" for v in VARIANTS)
             + " | BigMac/FG prefill | FG 10-token s | BigMac 10-token s |", "|---" * 9 + "|"]
    for name, run in runs.items():
        r = run["results"]
        if "inference" not in r["bigmac"]:
            continue
        for batch in r["bigmac"]["inference"]:
            row = {v: r[v]["inference"][batch] for v in VARIANTS}
            ratio = row["bigmac"]["prefill_tokens_per_s"] / row["fine_grained"]["prefill_tokens_per_s"]
            lines.append(f"| {name} | {batch} | " + " | ".join(
                f"{row[v]['prefill_tokens_per_s']:,.0f}" for v in VARIANTS)
                + f" | {ratio:.2f}x | {row['fine_grained']['generate_10_s']:.3f}"
                + f" | {row['bigmac']['generate_10_s']:.3f} |")
    return "\n".join(lines)


def project_to_paper_cluster(ep1_run: dict, compute_scale: float, ep: int = 32,
                             gpus_per_node: int = 8, nic_gbit_s: float = 100.0) -> dict:
    """Projected training step time (ms) per structure on the paper's cluster."""
    args = ep1_run["args"]
    tokens = args["micro_batch"] * args["seq"]
    per_gpu_bytes_s = nic_gbit_s / 8 * 1e9 / gpus_per_node
    leaves_node = (ep - gpus_per_node) / (ep - 1)
    projected = {}
    for v in ("fine_grained", "bigmac"):
        width = args["hidden"] * (args["ratio"] if v == "bigmac" else 1.0)
        # dispatch + combine, forward + backward, each layer; bf16 (2 bytes) tokens.
        a2a_bytes = 4 * args["layers"] * tokens * args["topk"] * (ep - 1) / ep * width * 2
        comm_ms = a2a_bytes * leaves_node / per_gpu_bytes_s * 1e3
        compute_ms = ep1_run["results"][v]["step_ms_median"] * compute_scale
        projected[v] = {"compute_ms": compute_ms, "alltoall_ms": comm_ms,
                        "step_ms": compute_ms + comm_ms}
    projected["speedup"] = projected["fine_grained"]["step_ms"] / projected["bigmac"]["step_ms"]
    return projected


def bar_chart(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(figsize=(1.9 * len(names) + 2, 4))
    width = 0.2
    for i, v in enumerate(VARIANTS):
        xs = [j + (i - 1.5) * width for j in range(len(names))]
        ys = [runs[n]["results"][v]["step_ms_median"] for n in names]
        ax.bar(xs, ys, width, label=v)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("training step (ms, median)")
    device = next(iter(runs.values()))["device"]
    ax.set_title(f"GPT MoE, 4 layers, 64 experts, EP=world size, {device}")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results_dir", type=Path)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--compute-scale", type=float, nargs="*", default=[1.0, 6.6],
                   help="compute-time multipliers for the projection (6.6 ~ H200 989 / ~150 "
                        "dense bf16 TFLOP/s of a 48 GB PCIe Ampere card)")
    args = p.parse_args()
    runs = load(args.results_dir)
    ep_runs = {n: r for n, r in runs.items() if r["world_size"] > 1}
    print("## Training step\n\n" + training_table(ep_runs) + "\n")
    print("## Where the time goes (forward stages, CUDA events; NCCL kernels, profiler)\n\n"
          + breakdown_table(ep_runs) + "\n")
    print("## Inference\n\n" + inference_table(ep_runs) + "\n")
    ep1 = next((r for r in runs.values() if r["world_size"] == 1), None)
    if ep1:
        print("## EP=1, one GPU\n\n" + training_table({k: r for k, r in runs.items()
                                                     if r["world_size"] == 1}) + "\n")
        print("## Projection to the paper's cluster (EP=32, 4 x 8 GPUs, 100 Gb/s IB per node)\n")
        print("| compute scale | Fine-Grained ms | BigMac ms | projected speedup |\n|---|---|---|---|")
        for scale in args.compute_scale:
            proj = project_to_paper_cluster(ep1, scale)
            print(f"| {scale:g} | {proj['fine_grained']['step_ms']:.0f} "
                  f"({proj['fine_grained']['alltoall_ms']:.0f} A2A) | "
                  f"{proj['bigmac']['step_ms']:.0f} ({proj['bigmac']['alltoall_ms']:.0f} A2A) | "
                  f"{proj['speedup']:.2f}x |")
    if args.png:
        bar_chart(ep_runs, args.png)


if __name__ == "__main__":
    main()

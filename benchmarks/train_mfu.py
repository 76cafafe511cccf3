"""Training throughput and MFU of the runner, several configs side by side in one command.

    python benchmarks/train_mfu.py --out benchmarks/results/train_mfu_h100.json \
        configs/small/vanilla.yaml configs/small/fine_grained.yaml configs/small/bigmac.yaml

Each config is trained by the real runner (`python -m megatron_bigmac.train`, one process, the
config's own batch sizes and precision) for --iters iterations on mock data (random tokens: no
corpus needed; throughput does not depend on the text), one after the other, --rounds times in
turn. The first --skip logged intervals (warm-up, allocator growth) are dropped, and so is a last
interval shorter than --log-interval (the trainer also logs the last iteration); the JSON keeps
every full interval, the table their median. ``--set key=value`` (repeatable) overrides a key in
every run, e.g. ``--set micro_batch_size=32``; ``CONFIG@key=value,key=value`` overrides keys in one
run only, for variants of one config side by side:

    python benchmarks/train_mfu.py --out x.json configs/small/bigmac.yaml \
        configs/small/bigmac.yaml@layernorm_fusion=false,moe_activation_fusion=false

``--baseline DIR`` also runs every config with the code of DIR, an earlier checkout (e.g.
``git worktree add /tmp/base <commit>``), right after the current code's run of it, labelled
``baseline:CONFIG``: a change measured against the code before it in one command.

MFU is the runner's: model FLOPs of costs.training_flops_per_iteration (Megatron-LM's formula:
matmuls only, backward = 2 x forward, no recomputation) over the step time and the 989 TFLOP/s
bf16 peak of an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MOCK = ["mock_data=true", "train_data_path=[]", "valid_data_path=[]", "eval_iters=0",
        "save=null", "save_interval=null"]


def run_one(config: str, iters: int, log_interval: int, overrides, workdir: Path,
            code: Path | None = None) -> list[dict]:
    """``code``: the checkout whose megatron_bigmac trains (and whose copy of ``config`` is
    used); None for this one. ``python -m`` imports from the working directory first."""
    log_dir = workdir / f"{Path(config).stem}_{time.monotonic_ns()}"
    command = [sys.executable, "-m", "megatron_bigmac.train", "--config", config, *MOCK,
               f"train_iters={iters}", f"log_interval={log_interval}",
               f"lr_warmup_iters={min(10, iters - 1)}", "lr_decay_iters=null",
               f"log_dir={log_dir}", *overrides]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=code)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"{config} failed (exit {done.returncode}):\n{tail}")
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "train"]


def summarize(intervals: list[dict]) -> dict:
    keys = ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu")
    out = {k: statistics.median(r[k] for r in intervals) for k in keys if k in intervals[0]}
    out["step_time_min_s"] = min(r["step_time_s"] for r in intervals)
    out["step_time_max_s"] = max(r["step_time_s"] for r in intervals)
    out["mem_allocated_gib"] = max(r.get("mem_allocated_gib", 0.0) for r in intervals)
    out["intervals"] = len(intervals)
    return out


def write_report(args, overrides, results: dict) -> dict:
    import torch

    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "overrides": overrides,
        "baseline": str(args.baseline) if args.baseline else None,
        "configs": {c: {"summary": summarize(r), "intervals": r} for c, r in results.items() if r},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--skip", type=int, default=2, help="logged intervals dropped as warm-up")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="an earlier checkout: each config also runs with its code")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.baseline and not (args.baseline / "megatron_bigmac" / "train.py").is_file():
        raise SystemExit(f"--baseline: {args.baseline} has no megatron_bigmac/train.py")
    overrides = args.set
    if args.iters // args.log_interval <= args.skip:
        raise SystemExit("--iters: no full logging interval left after --skip (--iters // "
                         "--log-interval must exceed --skip)")

    runs = [(entry, None) for entry in args.configs]
    if args.baseline:
        runs = [run for entry in args.configs
                for run in ((entry, None), (f"baseline:{entry}", args.baseline.resolve()))]
    results = {name: [] for name, _ in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, code in runs:
                config, _, own = name.removeprefix("baseline:").partition("@")
                run_overrides = overrides + [kv for kv in own.split(",") if kv]
                records = run_one(config, args.iters, args.log_interval, run_overrides, Path(tmp),
                                  code)
                # Full intervals only: a shorter last one would count as much in the median.
                results[name] += [r for r in records[args.skip:]
                                  if r["step"] % args.log_interval == 0]
                # Written after every run: a time limit or a crash keeps what was measured.
                report = write_report(args, overrides, results)

    print(f"\n{report['device']}: median of {args.rounds} x {args.iters} iterations "
          f"(first {args.skip} intervals dropped)")
    width = max(36, *(len(c) + 2 for c in report["configs"]))
    print(f"{'config':<{width}}{'s/step':>9}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'GiB':>7}")
    for config, entry in report["configs"].items():
        s = entry["summary"]
        mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else "-"
        tflops = f"{s['tflops_per_gpu']:.1f}" if "tflops_per_gpu" in s else "-"
        print(f"{config:<{width}}{s['step_time_s']:>9.3f}{s['tokens_per_s']:>12,.0f}{tflops:>9}"
              f"{mfu:>7}{s['mem_allocated_gib']:>7.1f}")


if __name__ == "__main__":
    main()

"""Metrics: per-run JSONL, TensorBoard when importable, a concise console line with a progress
bar and ETA, and the timers megatron-core's schedules report forward/backward time to.

Nothing here synchronizes the device except on logging steps: losses accumulate on the device
and are reduced across data-parallel ranks every ``log_interval`` iterations; timers measure only
when armed (the logging step), because timing a GPU needs a synchronization.
"""

from __future__ import annotations

import json
import math
import os
import resource
import textwrap
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

#: Warnings megatron-core 0.16.1 / torch raise on every run about things this runner does not
#: control (deprecated internals), kept off the console.
NOISY_WARNINGS = (
    "full scope is deprecated",
    "`load_state_dict` is deprecated",
    "Please use DTensor instead",
    ".*all_gather_into_tensor.* is deprecated",
)  # transformer-engine/apex absence: compat.OPTIONAL_ACCELERATOR_WARNINGS


def quiet_known_warnings() -> None:
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def format_config(values: dict, width: int = 100) -> str:
    """``key=value`` pairs wrapped to ``width``: the resolved config in a few console lines."""
    pairs = [f"{k}={v}" for k, v in values.items()]
    return "\n".join(textwrap.wrap("  ".join(pairs), width, break_long_words=False,
                                   break_on_hyphens=False))


def finite_or_none(value):
    """``value`` with every NaN/Infinity float in it (in dicts and lists too) as None: JSON has no
    such numbers (Python writes them bare, which strict parsers such as JavaScript's reject), so
    the files say null, which their readers take as non-finite."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """``json.dumps`` of ``value`` as strict JSON: non-finite floats become null."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


#: Dense bf16 peak of one H100/H200 SXM (989 TFLOP/s), for MFU.
H100_BF16_PEAK_TFLOPS = 989.0


class _Timer:
    def __init__(self, timers: "StepTimers", name: str):
        self._timers, self._name, self._start = timers, name, None

    def start(self, barrier: bool = False):
        if self._timers.armed:
            self._timers.synchronize()
            self._start = time.perf_counter()

    def stop(self, barrier: bool = False):
        if self._timers.armed and self._start is not None:
            self._timers.synchronize()
            self._timers.elapsed[self._name] += time.perf_counter() - self._start
            self._start = None


class StepTimers:
    """megatron-core's timers interface (``config.timers(name, log_level).start()/.stop()``),
    measuring only while armed. Schedules report 'forward-compute' and 'backward-compute' per
    micro-batch and 'all-grads-sync' for the gradient reduction; the trainer adds 'optimizer'."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.armed = False
        self.elapsed: Dict[str, float] = defaultdict(float)
        self._timers: Dict[str, _Timer] = {}

    def __call__(self, name: str, log_level: Optional[int] = None) -> _Timer:
        # One object per name: megatron-core starts and stops a timer through separate calls.
        if name not in self._timers:
            self._timers[name] = _Timer(self, name)
        return self._timers[name]

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def arm(self, armed: bool) -> None:
        self.armed = armed
        self.elapsed.clear()


def memory_gib(device: torch.device) -> Dict[str, float]:
    """Peak memory so far: allocated and reserved on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {
            "mem_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"mem_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(fraction * width))
    return "█" * filled + "·" * (width - filled)


class MetricsLogger:
    """Writes metrics on the main rank: ``<log_dir>/metrics.jsonl`` (one JSON object per logging
    step or evaluation, appended across resumes; a diverged NaN loss as null), TensorBoard
    scalars, and the console."""

    def __init__(self, log_dir: str, train_iters: int, enabled: bool,
                 tensorboard_dir: Optional[str] = None):
        self.enabled = enabled
        self.train_iters = train_iters
        self._jsonl = None
        self._tb = None
        self._started: Optional[float] = None
        self._started_iteration = 0
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.path = Path(log_dir) / "metrics.jsonl"
        self._jsonl = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir or os.path.join(log_dir, "tensorboard"))
        except ImportError:
            self._tb = None  # TensorBoard is optional

    def start(self, iteration: int) -> None:
        self._started, self._started_iteration = time.perf_counter(), iteration

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(strict_json(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def console_train(self, r: dict) -> None:
        if not self.enabled:
            return
        step = r["step"]
        done = step - self._started_iteration
        elapsed = time.perf_counter() - self._started if self._started else 0.0
        eta = elapsed / max(done, 1) * (self.train_iters - step)
        parts = [
            f"[{step:>{len(str(self.train_iters))}}/{self.train_iters}] "
            f"{_bar(step / self.train_iters)} {100 * step / self.train_iters:3.0f}%",
            f"loss {r['lm_loss']:.4f}",
        ]
        if "aux_loss" in r:
            parts.append(f"aux {r['aux_loss']:.3f}")
        parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}",
                  f"{r['tokens_per_s'] / 1e3:,.1f}k tok/s"]
        if "tflops_per_gpu" in r:
            mfu = f" {100 * r['mfu']:.1f}% MFU" if "mfu" in r else ""
            parts.append(f"{r['tflops_per_gpu']:.1f} TFLOP/s{mfu}")
        parts.append(f"{r['step_time_s']:.3f} s/it")
        parts.append(f"ETA {_duration(eta)}")
        print(" | ".join(parts), flush=True)

    def console_eval(self, r: dict) -> None:
        if self.enabled:
            print(f"[{r['step']:>{len(str(self.train_iters))}}/{self.train_iters}] validation: "
                  f"loss {r['lm_loss']:.4f} | perplexity {r['perplexity']:,.2f}", flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class StepProfiler:
    """torch.profiler over the iterations ``start`` .. ``end - 1`` (counted as completed
    iterations before the step, like Megatron-LM's --profile-step-start/end), on this rank only
    if it is one of ``ranks``. Writes ``<out_dir>/rank<R>.trace.json`` (chrome://tracing,
    Perfetto) and ``<out_dir>/rank<R>_kernels.txt``: operators and kernels by device time."""

    def __init__(self, out_dir: str, start: int, end: int, rank: int, ranks, cuda: bool):
        self.out_dir, self.start, self.end, self.rank = Path(out_dir), start, end, rank
        self.enabled = rank in ranks
        self.cuda = cuda
        self._profiler = None

    def step_begin(self, iteration: int) -> None:
        if self.enabled and iteration == self.start and self._profiler is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._profiler = profile(activities=activities, record_shapes=True)
            self._profiler.__enter__()
            self._module_ranges = ModuleRanges()

    def step_end(self, iteration: int) -> None:
        """``iteration``: completed iterations after the step."""
        if self._profiler is None or iteration < self.end:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self._module_ranges.remove()
        self._profiler.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}.trace.json"
        self._profiler.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = self._profiler.key_averages().table(sort_by=sort_by, row_limit=40,
                                                    max_name_column_width=70)
        steps = self.end - self.start
        (self.out_dir / f"rank{self.rank}_kernels.txt").write_text(
            f"iterations {self.start}..{self.end - 1} ({steps} steps), sorted by {sort_by}\n"
            + table)
        print(f"profile of {steps} iterations: {trace}\n{table}", flush=True)
        self._profiler = None
        self.enabled = False


class ModuleRanges:
    """While alive, every module's forward is a profiler range named ``module: <class>``, so a
    trace attributes each operator to the module that ran it, and its backward too, through the
    sequence number autograd gives both (benchmarks/trace_summary.py reads them)."""

    PREFIX = "module: "

    def __init__(self):
        self._open = []
        self._handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
            torch.nn.modules.module.register_module_forward_hook(self._exit),
        ]

    def _enter(self, module, args):
        scope = torch.autograd.profiler.record_function(self.PREFIX + type(module).__name__)
        scope.__enter__()
        self._open.append(scope)

    def _exit(self, module, args, output):
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        while self._open:
            self._open.pop().__exit__(None, None, None)


def reduce_loss_sums(sums: torch.Tensor, group) -> tuple[float, int]:
    """(mean loss, tokens) from a [loss sum, token count] tensor, summed over ``group``."""
    sums = sums.clone()
    if dist.is_initialized():
        dist.all_reduce(sums, group=group)
    loss_sum, tokens = sums.tolist()
    return loss_sum / max(tokens, 1), int(tokens)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))

"""The speed benchmark's smallest case runs end to end (2 gloo processes) and writes valid JSON.
Timings are not asserted: benchmarks are compared within one run, on the device."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_moe_speed_smallest_case_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(ROOT / "benchmarks" / "moe_speed.py"), "--layers", "1", "--hidden", "64",
         "--experts", "8", "--topk", "2", "--seq", "32", "--micro-batch", "2", "--warmup", "1",
         "--steps", "2", "--rounds", "1", "--infer-batches", "1", "--prompt", "8",
         "--out", str(out)],
        check=True, cwd=ROOT, capture_output=True, timeout=300,
    )
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert set(report["results"]) == {"stock", "fine_grained", "bigmac", "vanilla"}
    for row in report["results"].values():
        assert row["step_ms_median"] > 0 and row["tokens_per_s"] > 0
        assert set(row["inference"]["1"]) == {"prefill_tokens_per_s", "generate_1_s", "generate_10_s"}
    assert report["ratios"]["bigmac_speedup_over_fine_grained"] > 0


def _trace_summary():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "trace_summary", ROOT / "benchmarks" / "trace_summary.py")
    trace_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace_summary)
    return trace_summary


def test_trace_summary_attributes_kernels_to_modules_forward_and_backward():
    """A hand-written trace in torch.profiler's Chrome format: a forward kernel inside
    `module: Experts` (within `module: Layer`), its backward kernel on the autograd thread
    (same sequence number), an optimizer kernel, and one with no host range."""
    trace_summary = _trace_summary()

    def op(name, ts, dur, tid, cat="cpu_op", **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": args}

    def kernel(correlation, dur):
        return {"ph": "X", "cat": "kernel", "name": f"k{correlation}", "ts": 5000 + correlation,
                "dur": dur, "tid": 7, "args": {"correlation": correlation}}

    events = [
        op("module: Layer", 0, 100, 1, "user_annotation"),
        op("module: Experts", 10, 50, 1, "user_annotation"),
        op("aten::mm", 20, 10, 1, **{"Sequence number": 42}),
        op("cudaLaunchKernel", 22, 2, 1, "cuda_runtime", correlation=1),
        op("aten::add", 70, 5, 1, **{"Sequence number": 43}),  # in Layer, not in Experts
        op("cudaLaunchKernel", 71, 2, 1, "cuda_runtime", correlation=2),
        op("autograd::engine::evaluate_function: MmBackward0", 200, 30, 2,
           **{"Sequence number": 42, "Fwd thread id": 1}),
        op("cudaLaunchKernel", 210, 2, 2, "cuda_runtime", correlation=3),
        op("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 240, 10, 2),
        op("cudaLaunchKernel", 241, 2, 2, "cuda_runtime", correlation=4),
        op("Optimizer.step#AdamW.step", 300, 50, 1, "user_annotation"),
        op("cudaLaunchKernel", 310, 2, 1, "cuda_runtime", correlation=5),
        op("cudaLaunchKernel", 400, 2, 1, "cuda_runtime", correlation=6),
        kernel(1, 1000), kernel(2, 2000), kernel(3, 3000), kernel(4, 4000), kernel(5, 5000),
        kernel(6, 6000), kernel(7, 7000),  # 7: its launch was not traced
    ]
    assert trace_summary.module_times(events) == {
        "(launched outside the trace)": 7.0, "other": 6.0, "Optimizer.step#AdamW.step": 5.0,
        "torch::autograd::AccumulateGrad": 4.0, "Experts bwd": 3.0, "Layer fwd": 2.0,
        "Experts fwd": 1.0,
    }
    by_kernel = trace_summary.module_times(events, by_kernel=True)
    assert by_kernel[("Experts bwd", "k3")] == 3.0 and by_kernel[("Layer fwd", "k2")] == 2.0
    assert sum(by_kernel.values()) == 21.0  # k7's launch is not in the trace


def test_trace_summary_splits_matmul_kernels_and_gives_the_mfu_ceiling(tmp_path):
    """Kernel names as an H100 trace has them: cuBLASLt (nvjet), torch's grouped GEMM (CUTLASS),
    cuDNN attention count as matmul; elementwise, gather and Triton kernels do not. Two steps of
    1 ms wall, 0.8 ms busy, 0.5 ms of it matmul: 2e9 FLOPs per step -> 2e9 / 0.25 ms."""
    trace_summary = _trace_summary()

    def kernel(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7, "args": {}}

    events = [
        kernel("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 0, 200),
        kernel("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel", 200, 200),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 400, 100),
        kernel("void at::native::vectorized_elementwise_kernel<4>", 500, 150),
        kernel("void at::native::vectorized_gather_kernel<16>", 650, 100),
        kernel("triton_poi_fused__to_copy_exp_mul_sub_unsqueeze_2", 750, 50),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000, "tid": 1, "args": {}},
    ]
    trace = tmp_path / "rank0.trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    s = trace_summary.summarize(str(trace))
    assert s["kernel_sum_ms"] == 0.8 and s["matmul_kernel_ms"] == 0.5 and s["wall_ms"] == 1.0
    c = trace_summary.mfu_ceiling(s, flops_per_step=2e9, steps=2, peak=1e13)
    assert c["matmul_ms_per_step"] == 0.25
    assert abs(c["other_kernel_ms_per_step"] - 0.15) < 1e-12 and abs(c["idle_ms_per_step"] - 0.1) < 1e-12
    assert abs(c["mfu_ceiling"] - 2e9 / 0.25e-3 / 1e13) < 1e-12

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_summary.py"), str(trace),
                           "--flops-per-step", "2e9", "--steps", "2"],
                          capture_output=True, text=True, check=True)
    assert "matmul + attention kernels 0.5 ms (62%), everything else 0.3 ms" in done.stdout
    assert f"MFU ceiling at these matmul kernel times: {100 * 2e9 / 0.25e-3 / 989e12:.1f}%" in done.stdout


def test_train_mfu_runs_each_config_with_the_current_and_the_baseline_code(tmp_path):
    """--baseline DIR: each config also trains with DIR's megatron_bigmac (marked here so the
    test can see which code ran), and both runs land in the JSON under their own labels."""
    import shutil

    baseline = tmp_path / "base"
    shutil.copytree(ROOT / "megatron_bigmac", baseline / "megatron_bigmac",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", baseline / "configs")
    with open(baseline / "megatron_bigmac" / "__init__.py", "a") as f:
        f.write("\n__import__('pathlib').Path(__file__).with_name('IMPORTED').touch()\n")
    out = tmp_path / "mfu.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_mfu.py"), "configs/tiny/bigmac.yaml",
         "--baseline", str(baseline), "--iters", "4", "--log-interval", "1", "--skip", "1",
         "--set", "expert_model_parallel_size=1", "--set", "num_workers=0", "--out", str(out)],
        check=True, cwd=ROOT, capture_output=True, timeout=300,
    )
    report = json.loads(out.read_text())
    assert list(report["configs"]) == ["configs/tiny/bigmac.yaml",
                                       "baseline:configs/tiny/bigmac.yaml"]
    for entry in report["configs"].values():
        assert entry["summary"]["intervals"] == 3 and entry["summary"]["tokens_per_s"] > 0
    assert (baseline / "megatron_bigmac" / "IMPORTED").exists()
    assert not (ROOT / "megatron_bigmac" / "IMPORTED").exists()


def _train_mfu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_mfu", ROOT / "benchmarks" / "train_mfu.py")
    train_mfu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_mfu)
    return train_mfu


def test_train_mfu_keeps_full_logging_intervals_only(tmp_path, monkeypatch, capsys):
    """--iters 5 --log-interval 2: the trainer logs steps 2, 4 and 5 (the last iteration); step
    5's 1-iteration interval is not a logging interval's time and stays out of the median."""
    import pytest

    train_mfu = _train_mfu()
    times = {2: 4.0, 4: 1.0, 5: 3.0}
    records = [{"kind": "train", "step": s, "step_time_s": t, "tokens_per_s": 1 / t}
               for s, t in times.items()]
    monkeypatch.setattr(train_mfu, "run_one", lambda *args: records)
    out = tmp_path / "mfu.json"
    argv = ["train_mfu.py", "configs/tiny/bigmac.yaml", "--iters", "5", "--log-interval", "2",
            "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--skip", "1"])
    train_mfu.main()
    summary = json.loads(out.read_text())["configs"]["configs/tiny/bigmac.yaml"]["summary"]
    assert summary["intervals"] == 1 and summary["step_time_s"] == 1.0
    # --skip 2 leaves no full interval: refused before anything runs.
    monkeypatch.setattr(sys, "argv", argv + ["--skip", "2"])
    with pytest.raises(SystemExit, match="no full logging interval"):
        train_mfu.main()

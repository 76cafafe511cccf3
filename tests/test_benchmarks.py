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

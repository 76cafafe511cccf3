"""megatron_bigmac.report on a real tiny CPU run (4 iterations of tiny Fine-Grained, one process)
and on copies of its log made missing, partial, diverged (NaN) or resumed: the Markdown exists,
its images exist and are PNGs, its table's numbers are the log's values, and broken runs are
reported as such."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_bigmac import report

ROOT = Path(__file__).resolve().parents[1]
TRAIN_OVERRIDES = ("expert_model_parallel_size=1", "train_iters=4", "lr_warmup_iters=1",
                   "log_interval=2", "eval_interval=2", "eval_iters=1", "global_batch_size=4",
                   "micro_batch_size=4", "seq_length=32")
WIKITEXT = {"checkpoint": "ckpt/iter_0000004", "tokens": 1000, "loss": 5.25, "perplexity": 190.5665,
            "data": "../shared/data/wikitext/wikitext-2-raw-v1-test.nonempty.raw",
            "seq_length": 32, "stride": 32}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A log_dir written by the trainer: config.yaml + metrics.jsonl (evals at 0, 2, 4)."""
    out = tmp_path_factory.mktemp("fine_grained")
    env = dict(os.environ, MEGATRON_BIGMAC_CACHE=str(tmp_path_factory.mktemp("cache")),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megatron_bigmac.train", "--config",
           str(ROOT / "configs" / "tiny" / "fine_grained.yaml"), *TRAIN_OVERRIDES, f"log_dir={out}"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    return out


def records(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_records(run_dir: Path, recs: list, tail: str = "") -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)


def copy_run(src: Path, dst: Path, recs=None, tail: str = "") -> Path:
    """A run directory with src's config and ``recs`` (default: src's records) as its log."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    if recs is not None:
        write_records(dst, recs, tail)
    return dst


def table(markdown: str, heading: str) -> dict:
    """{run name: {column: cell}} of the first table after ``heading``."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return {row[0]: dict(zip(header, row)) for row in body}


def number(cell: str) -> float:
    return float(cell.replace(",", "").split()[0])


# ------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def mixed_report(real_run, tmp_path_factory):
    """Report on the real run and on copies: diverged (NaN from iteration 4), without a log,
    partial (iterations 0-2 and a line cut by a crash); the real run has a WikiText-2 result."""
    base = tmp_path_factory.mktemp("runs")
    recs = records(real_run)
    good = base / "fine_grained"
    shutil.copytree(real_run, good)
    (good / "evaluations.jsonl").write_text("some console line\n" + json.dumps(WIKITEXT) + "\n")
    nan = [dict(r, lm_loss=float("nan"), perplexity=float("nan")) if r["step"] >= 4 and r["kind"] == "eval"
           else dict(r, lm_loss=float("nan")) if r["step"] >= 4 else r for r in recs]
    diverged = copy_run(real_run, base / "diverged", nan)
    missing = copy_run(real_run, base / "no_log")
    partial = copy_run(real_run, base / "partial", [r for r in recs if r["step"] <= 2],
                       tail='{"kind": "train", "step": 4, "lm_lo')
    out = tmp_path_factory.mktemp("report")
    path = report.build_report([str(good), str(diverged), str(missing), str(partial)], str(out))
    return path, recs


def test_markdown_and_png_files_exist(mixed_report):
    path, _ = mixed_report
    text = path.read_text()
    images = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert sorted(images) == sorted(report.PLOTS.values())
    for image in images:
        data = (path.parent / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, image
    assert (path.parent / "summary.json").is_file()


def test_table_numbers_are_the_logs(mixed_report):
    path, recs = mixed_report
    rows = table(path.read_text(), "## Results")
    row = rows["fine_grained"]
    evals = [r for r in recs if r["kind"] == "eval"]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, 2, 4] and [r["step"] for r in train] == [2, 4]

    assert row["status"] == "complete"
    assert number(row["final val ppl"]) == round(evals[-1]["perplexity"], 2)
    assert number(row["best val ppl"]) == round(min(r["perplexity"] for r in evals), 2)
    assert number(row["WikiText-2 ppl"]) == round(WIKITEXT["perplexity"], 2)
    assert number(row["tokens/s"]) == round(statistics.median(r["tokens_per_s"] for r in train[1:]))
    assert row["tokens"] == "512"  # 4 iterations x 4 samples x 32 tokens
    # Target: the lowest final perplexity every finite run reaches. Diverged has no finite final
    # one; partial's (step 2) is higher than the real run's, which reaches it at step 2.
    target = evals[1]["perplexity"]
    target_col = f"time to ppl ≤ {target:,.2f}"
    assert target_col in row
    assert number(row[target_col]) == round(train[0]["step_time_s"] * 2, 1)  # seconds, at step 2

    summary = json.loads((path.parent / "summary.json").read_text())
    exact = summary["runs"][0]
    assert summary["target_ppl"] == target and summary["baseline"] == "fine_grained"
    assert exact["final_val_ppl"] == evals[-1]["perplexity"]
    assert exact["seconds_to_target"] == pytest.approx(train[0]["step_time_s"] * 2)
    assert exact["train_seconds"] == pytest.approx(sum(r["step_time_s"] * 2 for r in train))
    assert exact["evaluations"] == {"WikiText-2": WIKITEXT["perplexity"]}


def test_parameters_match_costs(mixed_report, real_run):
    from megatron_bigmac.costs import MoEModelShape, count_parameters

    path, _ = mixed_report
    counts = json.loads((path.parent / "summary.json").read_text())["runs"][0]["parameters"]
    # Tiny Fine-Grained: h=64, 8 experts 64 -> 16 -> 64, 2 layers, vocab 50,304, seq 32.
    shape = MoEModelShape(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                          padded_vocab_size=50304, num_experts=8, topk=2, structure="fine_grained",
                          expert_ffn_hidden_size=16, latent_size=None)
    expected = count_parameters(shape)
    assert counts == {"total": expected["total"],
                      "moe": expected["router"] + expected["experts"]}


def test_broken_runs_appear_as_such(mixed_report):
    path, _ = mixed_report
    text = path.read_text()
    rows = table(text, "## Results")
    assert rows["diverged"]["status"] == "diverged (it. 4)"
    assert rows["diverged"]["final val ppl"] == "NaN"
    assert rows["no_log"]["status"] == "no log"
    assert rows["no_log"]["final val ppl"] == "n/a" and rows["no_log"]["tokens"] == "n/a"
    assert rows["partial"]["status"] == "partial (2/4)"
    assert "**diverged**: diverged: non-finite loss at iteration 4" in text
    assert "**no_log**: no metrics.jsonl" in text
    assert "**partial**: 1 malformed line(s)" in text
    ratio_rows = table(text, "## Relative to fine_grained")
    assert ratio_rows["fine_grained (baseline)"]["tokens/s"] == "1.00x"
    assert ratio_rows["no_log"]["tokens/s"] == "n/a"


# ------------------------------------------------------------------------------ fixtures only
def fake_run(root: Path, name: str, evals: dict, step_time: float, iters: int = 4) -> Path:
    """A run in the trainer's format: evals {step: perplexity}, train records every 2 iterations."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(
        f"global_batch_size: 4\nseq_length: 32\ntrain_iters: {iters}\nmoe_structure: {name}\n")
    recs = []
    for step in range(0, iters + 1):
        if step and step % 2 == 0:
            recs.append({"kind": "train", "step": step, "consumed_samples": 4 * step, "lm_loss": 5.0,
                         "lr": 1e-3, "grad_norm": 1.0, "step_time_s": step_time,
                         "tokens_per_s": 128 / step_time})
        if step in evals:
            recs.append({"kind": "eval", "step": step, "lm_loss": math.log(evals[step]),
                         "perplexity": evals[step], "tokens": 128})
    write_records(run, recs)
    return run


def test_default_target_baseline_and_speedups(tmp_path):
    slow = fake_run(tmp_path, "slow", {0: 1000.0, 2: 100.0, 4: 50.0}, step_time=2.0)
    fast = fake_run(tmp_path, "fast", {0: 1000.0, 2: 60.0, 4: 55.0}, step_time=1.0)
    path = report.build_report([str(fast), str(slow)], str(tmp_path / "out"), baseline="slow")
    summary = json.loads((path.parent / "summary.json").read_text())
    # 50 is not reached by fast; 55 is reached by both (slow at 4, fast at 4).
    assert summary["target_ppl"] == 55.0 and summary["baseline"] == "slow"
    fast_row = summary["runs"][0]
    assert fast_row["seconds_to_target"] == 4.0 and summary["runs"][1]["seconds_to_target"] == 8.0
    assert fast_row["ratios"]["time_to_target"] == 2.0 and fast_row["ratios"]["tokens_per_s"] == 2.0
    assert fast_row["ratios"]["final_val_ppl_pct"] == pytest.approx(10.0)

    explicit = report.build_report([str(fast), str(slow)], str(tmp_path / "out2"), target_ppl=70)
    summary = json.loads((explicit.parent / "summary.json").read_text())
    assert [r["target_step"] for r in summary["runs"]] == [2, 4]
    assert "time to ppl ≤ 70.00" in explicit.read_text()


def test_run_stopped_early_is_compared_at_its_own_last_step(tmp_path):
    base = fake_run(tmp_path, "base", {0: 1000.0, 2: 100.0, 4: 50.0}, step_time=1.0)
    early = fake_run(tmp_path, "early", {0: 1000.0, 2: 110.0}, step_time=1.0, iters=2)
    path = report.build_report([str(base), str(early)], str(tmp_path / "out"))
    ratios = json.loads((path.parent / "summary.json").read_text())["runs"][1]["ratios"]
    assert ratios["final_val_ppl_pct"] == pytest.approx(10.0)  # 110 vs the baseline's 100 at 2
    assert ratios["final_val_ppl_step"] == 2
    row = table(path.read_text(), "## Relative to")["early"]
    assert row["final val ppl"] == "+10.00% (at step 2)"


def test_resumed_log_keeps_the_latest_records(tmp_path):
    run = fake_run(tmp_path, "resumed", {0: 1000.0, 2: 100.0, 4: 50.0}, step_time=1.0)
    recs = records(run)
    # Crashed after iteration 4, resumed from the checkpoint at 2: steps 4 are logged again.
    again = [dict(r, step_time_s=3.0, perplexity=40.0 if r["kind"] == "eval" else None)
             for r in recs if r["step"] == 4]
    write_records(run, recs + [{k: v for k, v in r.items() if v is not None} for r in again])
    loaded = report.read_run(run, "resumed")
    assert [r["step"] for r in loaded.train] == [2, 4] and loaded.train[-1]["step_time_s"] == 3.0
    assert [r["perplexity"] for r in loaded.evals] == [1000.0, 100.0, 40.0]
    assert loaded.resumes == 1 and report.clock(loaded)[-1] == (4, 8.0)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: RUN_DIR: no such directory") and err.count("\n") == 1
    run = fake_run(tmp_path, "one", {0: 10.0, 4: 5.0}, step_time=1.0)
    assert report.main([str(run), "--out", str(tmp_path / "out"), "--baseline", "other"]) == 2
    assert "--baseline" in capsys.readouterr().err
    assert report.main([str(run), "--out", str(tmp_path / "out"), "--target-ppl", "-1"]) == 2
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "README.md").is_file()


def test_runs_table_resolves_expert_width_and_lists_other_config_differences(real_run, tmp_path):
    """The structure's default expert width (config: null) is shown resolved; keys outside the
    runs table that differ from the baseline's are listed, paths left out."""
    import yaml

    config = yaml.safe_load((real_run / "config.yaml").read_text())
    assert config["moe_ffn_hidden_size"] is None  # tiny Fine-Grained: r*h = 0.25 * 64
    other = copy_run(real_run, tmp_path / "other", records(real_run))
    changed = dict(config, clip_grad=0.5, log_dir="/elsewhere", save="/elsewhere/ckpt")
    del changed["moe_latent_init"]
    # A key one config leaves unset (null) and the other lacks (older code) is no difference.
    config_exit = config.get("exit_interval", "missing")
    assert config_exit is None
    del changed["exit_interval"]
    (other / "config.yaml").write_text(yaml.safe_dump(changed))
    path = report.build_report([str(real_run), str(other)], str(tmp_path / "out"))
    markdown = path.read_text()
    assert {row["expert ffn"] for row in table(markdown, "## Runs").values()} == {"16"}
    lines = [line for line in markdown.splitlines() if line.startswith("- **other**")]
    assert lines == [f"- **other**: clip_grad `0.5` ({real_run.name}: `{config['clip_grad']}`), "
                     f"moe_latent_init absent ({real_run.name}: `variance_preserving`)"]


def _strict(text: str):
    """json.loads that refuses NaN/Infinity (not JSON: JavaScript's JSON.parse fails on them)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_diverged_run_is_written_as_strict_json_and_reported_as_diverged(tmp_path):
    """The trainer's writer logs a NaN loss (and the NaN grad norm of a skipped step) as null; the
    report reads null as non-finite and writes its own NaN perplexity as null too."""
    from megatron_bigmac.training.metrics import MetricsLogger

    run = tmp_path / "diverged"
    logger = MetricsLogger(str(run), train_iters=4, enabled=True,
                           tensorboard_dir=str(tmp_path / "tb"))
    nan = float("nan")
    for step, loss in ((2, 5.0), (4, nan)):
        logger.write({"kind": "train", "step": step, "consumed_samples": 4 * step, "lm_loss": loss,
                      "lr": 1e-3, "grad_norm": 1.0 if loss == loss else nan, "step_time_s": 1.0,
                      "tokens_per_s": 128.0})
        logger.write({"kind": "eval", "step": step, "lm_loss": loss, "perplexity": math.exp(loss),
                      "tokens": 128})
    logger.close()
    (run / "config.yaml").write_text("global_batch_size: 4\nseq_length: 32\ntrain_iters: 4\n")

    lines = [_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train, evaluation = [r for r in lines if r["step"] == 4]
    assert train["lm_loss"] is None and train["grad_norm"] is None
    assert evaluation["lm_loss"] is None and evaluation["perplexity"] is None
    path = report.build_report([str(run)], str(tmp_path / "out"))
    row = table(path.read_text(), "## Results")["diverged"]
    assert row["status"] == "diverged (it. 4)" and row["final val ppl"] == "NaN"
    assert number(row["best val ppl"]) == round(math.exp(5.0), 2)
    summary = _strict((path.parent / "summary.json").read_text())
    assert summary["runs"][0]["final_val_ppl"] is None
    assert summary["runs"][0]["val_ppl_by_step"] == {"2": math.exp(5.0)}


def test_run_whose_tokenizer_dir_is_not_here_is_reported_without_parameter_counts(real_run,
                                                                                   tmp_path):
    """A run trained with tokenizer_dir on a cluster path: the report (on another machine) has
    no vocabulary for the parameter counts, leaves them out and still reports the run."""
    import yaml

    run = copy_run(real_run, tmp_path / "elsewhere")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["tokenizer_dir"] = str(tmp_path / "cluster" / "tokenizer")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    path = report.build_report([str(run)], str(tmp_path / "out"))
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["runs"][0]["parameters"] is None
    assert "elsewhere" in table(path.read_text(), "## Results")

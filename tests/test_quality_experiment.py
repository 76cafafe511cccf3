"""scripts/quality_experiment.sh end to end on CPU, in miniature: a DATA_DIR laid out like
../shared/data but holding the package's own samples (one "shard", the WikiText-2 articles), the
tiny BigMac for 4 iterations in one process (the other structures go through the same loop; one
keeps the test near 40 s), evaluated on the first WikiText-2 tokens. The tarball must hold the
run's logs, its WikiText-2 result and the report, and no checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "quality_experiment.sh"
SAMPLE = ROOT / "megatron_bigmac" / "assets" / "sample"
STRUCTURES = ("bigmac",)


def make_data_dir(root: Path) -> Path:
    data = root / "data"
    (data / "enwiki").mkdir(parents=True)
    (data / "wikitext").mkdir()
    (data / "enwiki" / "enwiki-2015-train-00000-of-00005.jsonl.gz").symlink_to(
        SAMPLE / "enwiki-2015-sample-train.jsonl.gz")
    (data / "wikitext" / "wikitext-2-raw-v1-test.articles.jsonl.gz").symlink_to(
        SAMPLE / "wikitext-2-raw-v1-test.articles.jsonl.gz")
    return data


def script_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_BIGMAC_CACHE"}
    env.update(CUDA_VISIBLE_DEVICES="", DEADLINE_S="0")
    env.update(extra)
    return env


def run_script(args, env, timeout=300):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    data, work, out = make_data_dir(tmp), tmp / "work", tmp / "out"
    env = script_env(
        CONFIG_DIR="configs/tiny", NPROC="1", SHARDS="1", STRUCTURES=" ".join(STRUCTURES),
        EXTRA="expert_model_parallel_size=1 global_batch_size=4 micro_batch_size=4 seq_length=32",
        EVAL_ARGS="--max-tokens 2000",
    )
    r = run_script([data, work, out, 4], env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return work, out, r.stdout


def test_runs_use_the_schedule_and_data_asked_for(experiment):
    work, _, _ = experiment
    for s in STRUCTURES:
        cfg = yaml.safe_load((work / "runs" / s / "config.yaml").read_text())
        assert cfg["moe_structure"] == s
        assert (cfg["train_iters"], cfg["lr_decay_iters"], cfg["lr_warmup_iters"]) == (4, 4, 0)
        assert cfg["seed"] == 1234 and cfg["eval_interval"] == 1
        assert cfg["train_data_path"] == [str(work / "data" / "enwiki-train_text_document")]
        # Validation stays the config's own (the shipped held-out sample), for comparability.
        assert cfg["valid_data_path"] == ["sample:enwiki-2015-sample-valid"]
        assert cfg["save"] == cfg["log_dir"] == str(work / "runs" / s)
        assert (work / "runs" / s / "iter_0000004").is_dir()  # one checkpoint, at the end
        assert not (work / "runs" / s / "iter_0000002").exists()


def test_tarball_holds_logs_results_and_report_but_no_checkpoint(experiment):
    work, out, _ = experiment
    assert sorted(p.name for p in out.iterdir()) == ["quality_runs.tar.gz", "report"]
    with tarfile.open(out / "quality_runs.tar.gz") as tar:
        names = set(tar.getnames())
        for s in STRUCTURES:
            for f in ("config.yaml", "metrics.jsonl", "evaluations.jsonl", "train.log",
                      "evaluate.log"):
                assert f"runs/{s}/{f}" in names
        for f in ("README.md", "summary.json", "val_ppl_vs_tokens.png"):
            assert f"report/{f}" in names
        assert {"logs/quality_experiment.log", "logs/preprocess.log", "logs/timings.tsv"} <= names
        assert not [n for n in names if "iter_" in n or "tensorboard" in n]
        summary = json.load(tar.extractfile("report/summary.json"))
    assert summary["baseline"] == "bigmac"  # Fine-Grained when it is among the runs
    assert [row["name"] for row in summary["runs"]] == list(STRUCTURES)
    for row in summary["runs"]:
        assert row["status"] == "complete", row
        assert math.isfinite(row["final_val_ppl"]) and math.isfinite(row["evaluations"]["WikiText-2"])


def test_wikitext_result_is_the_evaluate_json(experiment):
    work, _, stdout = experiment
    for s in STRUCTURES:
        lines = (work / "runs" / s / "evaluations.jsonl").read_text().splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["data"].endswith("wikitext-2-raw-v1-test.articles.jsonl.gz")
        assert record["checkpoint"].endswith("iter_0000004") and record["tokens"] == 1999
        assert f"{record['perplexity']:,.2f}" in stdout  # the summary table
    assert "WikiText-2 ppl" in stdout and "tokens/s" in stdout


def test_refuses_to_append_to_an_existing_run(experiment, tmp_path):
    work, _, _ = experiment
    r = run_script([make_data_dir(tmp_path), work, tmp_path / "out"],
                   script_env(CONFIG_DIR="configs/tiny", SHARDS="1", STRUCTURES="bigmac"))
    assert r.returncode == 2
    assert "runs/bigmac exists (FORCE=1 deletes it" in r.stderr


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "expected DATA_DIR WORK_DIR OUT_DIR [ITERS], got 0 argument(s)"),
    (["/no/such/dir", "w", "o"], {}, "DATA_DIR: no such directory: /no/such/dir"),
    (["DATA", "w", "o", "ten"], {}, "ITERS must be a positive integer, got 'ten'"),
    (["DATA", "w", "o"], {"SHARDS": "2"}, "1 of the 2 enwiki shards wanted"),
    (["DATA", "w", "o"], {"STRUCTURES": "bigmac dense"},
     "STRUCTURES: no config configs/small/dense.yaml for 'dense'"),
])
def test_bad_arguments(tmp_path, args, env, message):
    data = make_data_dir(tmp_path)
    args = [data if a == "DATA" else (tmp_path / a if a in ("w", "o") else a) for a in args]
    r = run_script(args, script_env(**env), timeout=30)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "w").exists()  # nothing created before the arguments are checked


def test_config_dir_and_wikitext_relative_to_the_caller(tmp_path):
    """Both are found from the caller's directory, not the repository root the script moves to:
    the run stops only at the next check (an existing run directory)."""
    caller = tmp_path / "caller"
    shutil.copytree(ROOT / "configs" / "tiny", caller / "myconfigs")
    (caller / "my_wikitext.raw").write_text("text\n")
    (tmp_path / "work" / "runs" / "bigmac").mkdir(parents=True)
    env = script_env(CONFIG_DIR="myconfigs", WIKITEXT="my_wikitext.raw", SHARDS="1",
                     STRUCTURES="bigmac")
    r = subprocess.run(["bash", str(SCRIPT), make_data_dir(tmp_path), tmp_path / "work", "out"],
                       env=env, cwd=caller, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "runs/bigmac exists (FORCE=1 deletes it" in r.stderr, r.stderr


def test_deadline_stops_a_long_run_by_itself_with_its_checkpoint(tmp_path):
    """DEADLINE_S far shorter than the run: the trainer stops itself within its time share
    (exit_duration_in_mins, no signal), checkpointed, and the evaluation and report still come;
    the report calls the run partial."""
    data, work, out = make_data_dir(tmp_path), tmp_path / "work", tmp_path / "out"
    env = script_env(
        CONFIG_DIR="configs/tiny", NPROC="1", SHARDS="1", STRUCTURES="bigmac",
        EXTRA="expert_model_parallel_size=1 global_batch_size=4 micro_batch_size=4 seq_length=32",
        EVAL_ARGS="--max-tokens 2000", DEADLINE_S="120", POST_RUN_S="20", FINAL_S="20",
    )
    r = run_script([data, work, out, 100000], env, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "exit_duration_in_mins" in r.stdout and "stopped with its checkpoint" in r.stdout
    assert "SIGUSR1 sent" not in r.stdout and "FAILED" not in r.stdout
    saved = int((work / "runs" / "bigmac" / "latest_checkpointed_iteration.txt").read_text())
    assert 0 < saved < 100000
    assert "WikiText-2 perplexity" in r.stdout
    summary = json.loads((out / "report" / "summary.json").read_text())
    # The report counts logged iterations (every 10 here); the checkpoint may be a few later.
    logged = int(summary["runs"][0]["status"].removeprefix("partial (").split("/")[0])
    assert summary["runs"][0]["status"] == f"partial ({logged}/100000)"
    assert 0 <= saved - logged < 10

"""Resuming and stopping the pretraining runner on CPU (tiny BigMac, 2 gloo processes, the shipped
enwiki sample):

* per-rank RNG states are restored only under the parallel layout they were saved with (TP=1,
  EP=2 -> TP=2, EP=1 keeps 2 processes but not the layout);
* a config that changes the resumed run's schedule or data order is refused before anything is
  built, in one line naming every key with its checkpoint -> config values; a longer train_iters
  is reported, not refused;
* SIGUSR1 during startup (data and model building) stops the run cleanly before its first step,
  with a checkpoint at iteration 0 to resume from, and a restart signalled again has nothing new
  to save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "bigmac.yaml"
SHORT = ("train_iters=2", "lr_warmup_iters=1", "lr_decay_iters=2", "log_interval=1",
         "eval_iters=1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def command(cache: Path, *overrides: str):
    env = dict(os.environ, MEGATRON_BIGMAC_CACHE=str(cache), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megatron_bigmac.train", "--config", str(TINY), *SHORT, *overrides]
    return cmd, env


def run(cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd, env = command(cache, *overrides)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def train_losses(log_dir: Path) -> dict:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm_loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def checkpoint(cache, tmp_path_factory):
    """2 iterations under TP=1, EP=2, saved at iteration 2."""
    out = tmp_path_factory.mktemp("saved")
    r = run(cache, f"save={out}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out


# ------------------------------------------------------------------------------ parallel layout
def test_rng_states_restore_only_under_the_saved_parallel_layout(cache, checkpoint, tmp_path):
    r = run(cache, f"load={checkpoint}", f"log_dir={tmp_path}", "train_iters=3",
            "tensor_model_parallel_size=2", "expert_model_parallel_size=1",
            "expert_tensor_parallel_size=1", "sequence_parallel=true")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    # The same 2 processes, another layout: the saved per-rank RNG states would be wrong here.
    assert ("[checkpoint] parallel layout differs from the checkpoint's (tensor_model_parallel_size"
            " 1 -> 2, expert_model_parallel_size 2 -> 1, data_parallel_size 2 -> 1): RNG states"
            " stay as seeded") in r.stdout
    assert "resumed from" in r.stdout and list(train_losses(tmp_path)) == [3]
    # A longer run is how a run is extended: reported, not refused.
    assert (f"[checkpoint] WARNING: resuming {checkpoint / 'iter_0000002'} with changed keys: "
            "train_iters: 2 -> 3") in r.stdout


def test_checkpoints_without_a_saved_layout_take_it_from_their_config(checkpoint):
    from megatron.core import dist_checkpointing

    from megatron_bigmac.training.checkpoint import _saved_layout

    common = dist_checkpointing.load_common_state_dict(str(checkpoint / "iter_0000002"))
    layout = common.pop("parallel_layout")
    assert layout == {"world_size": 2, "tensor_model_parallel_size": 1,
                      "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 2,
                      "expert_tensor_parallel_size": 1, "data_parallel_size": 2}
    assert _saved_layout(common) == layout  # what an older checkpoint of this run would give
    config = dict(common["config"], tensor_model_parallel_size=2, sequence_parallel=True,
                  expert_tensor_parallel_size=None)  # megatron-core's default: TP
    assert _saved_layout({"world_size": 8, "config": config}) == {
        "world_size": 8, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
        "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 2,
        "data_parallel_size": 4}


# ------------------------------------------------------------------------------ schedule keys
def test_resume_refuses_a_changed_schedule_naming_every_key(cache, checkpoint, tmp_path):
    r = run(cache, f"load={checkpoint}", f"log_dir={tmp_path}", "lr=1e-3", "seed=7",
            "global_batch_size=32", "adam_beta2=0.99")
    assert r.returncode != 0
    # One line from the main rank, before any process group exists, and no traceback of the
    # ConfigError (torchrun still reports the workers' exit status 2 in its own way).
    errors = [line for line in r.stderr.splitlines() if line.startswith("config error:")]
    assert errors == [
        f"config error: global_batch_size: 16 -> 32, seed: 1234 -> 7, lr: 0.003 -> 0.001, "
        f"adam_beta2: 0.95 -> 0.99: cannot resume from {checkpoint / 'iter_0000002'}, which keeps "
        f"the saved model shape, LR schedule, optimizer and data order; set these keys to the "
        f"checkpoint's values"], r.stderr[-5000:]
    assert "ConfigError" not in r.stderr and "config (saved as" not in r.stdout


def test_load_without_a_checkpoint_is_refused_unless_it_is_the_runs_own_save(cache, tmp_path):
    """``load`` naming a directory that holds no checkpoint (a parent of runs, a typo'd run)
    would silently start from scratch; only a run's own ``save`` may be empty (first start)."""
    r = run(cache, f"load={tmp_path}", f"save={tmp_path / 'new'}", f"log_dir={tmp_path / 'new'}")
    assert r.returncode != 0
    assert f"config error: load: no checkpoint in {tmp_path}" in r.stderr, r.stderr[-3000:]
    # Its own save directory, spelled differently: a fresh run.
    own = tmp_path / "own"
    own.mkdir()
    r = run(cache, f"load={own}/../own", f"save={own}", f"log_dir={own}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "resumed from" not in r.stdout and (own / "iter_0000002").is_dir()


def test_check_compatible_refuses_shape_and_schedule_keys_and_reports_changeable_ones():
    from megatron_bigmac.training.checkpoint import check_compatible
    from megatron_bigmac.training.config import ConfigError, load_config

    cfg = load_config(TINY, ["train_iters=300", "lr_decay_iters=200", "clip_grad=0.5"],
                      world_size=2, cuda=False)
    saved = cfg.to_dict()
    saved.update(train_iters=200, clip_grad=1.0)
    assert check_compatible(saved, cfg, Path("ckpt")) == ["train_iters: 200 -> 300",
                                                           "clip_grad: 1.0 -> 0.5"]
    saved.update(num_layers=4, lr_decay_iters=300, split="98,1,1")
    with pytest.raises(ConfigError, match=r"^num_layers: 4 -> 2, split: '98,1,1' -> '969,30,1', "
                                          r"lr_decay_iters: 300 -> 200: cannot resume from ckpt,"):
        check_compatible(saved, cfg, Path("ckpt"))


# ------------------------------------------------------------------------------ exit signal
def _signal_during_startup(cache: Path, save: Path) -> subprocess.CompletedProcess:
    """Start a run and send SIGUSR1 to rank 0 alone once it has printed its config, while it
    builds the data and the model (the other rank learns of it from rank 0)."""
    cmd, env = command(cache, f"save={save}", f"load={save}")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("config (saved as"):
            break
    rank0 = next(p for p in psutil.Process(proc.pid).children()
                 if p.environ().get("RANK") == "0")
    rank0.send_signal(signal.SIGUSR1)
    rest, _ = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(output) + rest)


def test_signal_during_startup_stops_before_the_first_step_with_a_checkpoint(cache, checkpoint,
                                                                             tmp_path):
    save = tmp_path / "run"
    r = _signal_during_startup(cache, save)
    assert r.returncode == 0, r.stdout[-5000:]
    assert f"[0/2] exit signal: stopped with its checkpoint in {save}" in r.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert train_losses(save) == {} and "validation" not in r.stdout

    # Restarted with the same command (a requeue) and signalled again: it resumes from that
    # checkpoint and stops without writing it again.
    written = (save / "iter_0000000" / "metadata.json").stat().st_mtime_ns
    r = _signal_during_startup(cache, save)
    assert r.returncode == 0, r.stdout[-5000:]
    assert "resumed from" in r.stdout
    assert f"[0/2] exit signal: stopped with its checkpoint in {save}" in r.stdout
    assert (save / "iter_0000000" / "metadata.json").stat().st_mtime_ns == written

    # Restarted once more, undisturbed: the run the signal interrupted, step for step.
    r = run(cache, f"save={save}", f"load={save}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert train_losses(save) == train_losses(checkpoint)


# ------------------------------------------------------------------------------ exit duration
def test_exit_duration_stops_with_a_checkpoint_without_a_signal(cache, tmp_path):
    """exit_duration_in_mins shorter than the start-up: the run stops before its first step,
    checkpointed, as for a signal, and says why."""
    save = tmp_path / "run"
    r = run(cache, f"save={save}", "exit_duration_in_mins=0.001")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"[0/2] exit_duration_in_mins 0.001: stopped with its checkpoint in {save}" in r.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "0"


# ------------------------------------------------------------------------------ exit interval
def test_exit_interval_stops_early_on_the_full_schedule_and_resumes(cache, tmp_path):
    """exit_interval=2 of train_iters=4: stops after iteration 2 with a validation and a
    checkpoint, its learning rates those of the 4-iteration schedule; resumed without it, the
    run goes on to iteration 4."""
    save = tmp_path / "run"
    schedule = ("train_iters=4", "lr_decay_iters=4", "eval_interval=3", f"save={save}")
    r = run(cache, *schedule, "exit_interval=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"[2/4] exit_interval 2: stopped with its checkpoint in {save}" in r.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert len(lrs) == 2 and lrs[1] > 2 * 3.0e-4, lrs  # min_lr 3e-4: far from decayed at 2 of 4

    r = run(cache, *schedule, f"load={save}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "exit_interval: 2 -> None" in r.stdout + r.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert sorted(train_losses(save)) == [1, 2, 3, 4]

"""scripts/slurm/pretrain.sbatch on a real SLURM (one node on loopback, set up by
`bash .ci/slurm-setup.sh`): the unchanged script, only the resources differ on the command line.

  * the tiny BigMac config with 2 CPU processes runs to the end: job COMPLETED, log, checkpoint;
  * SIGUSR1 to the batch script (what --signal=B:USR1@300 sends before the time limit) makes the
    trainer checkpoint and stop, the script requeues the job, and the requeued job resumes from
    that checkpoint and finishes;
  * a missing config, a process count that does not fit the parallel sizes and an unreachable
    rendezvous host fail the job with a clear message.

Skipped only when sbatch is not on PATH; with sbatch but no controller the tests fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
TINY = ROOT / "configs" / "tiny" / "bigmac.yaml"

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="sbatch is not on PATH: no SLURM here (CI installs one with bash .ci/slurm-setup.sh)",
)

# Short tiny runs: the first SLURM test proves the launch, not the learning.
TINY_ARGS = ["lr_warmup_iters=1", "eval_interval=100", "eval_iters=1", "log_interval=1"]


@pytest.fixture(scope="module", autouse=True)
def slurm_up():
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "is UP" not in ping.stdout:
        pytest.fail("sbatch is installed but slurmctld does not answer (scontrol ping: "
                    f"{ping.stdout.strip() or ping.stderr.strip()}): run bash .ci/slurm-setup.sh")
    # Jobs an interrupted earlier run of these tests left behind would hold the node's CPUs.
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout
    for line in jobs.splitlines():
        job_id, _, name = line.partition(" ")
        if re.fullmatch(r"(tiny|requeue|noconfig|misfit|nordzv)-[0-9a-f]{6}", name):
            subprocess.run(["scancel", job_id])
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout
    if not re.search(r"idle|mixed|allocated|completing", state):
        pytest.fail(f"no SLURM node is usable (sinfo: {state.strip()!r}): run bash .ci/slurm-setup.sh")


def job_env(**extra):
    env = dict(os.environ, PYTHON=sys.executable)
    for key in ("NPROC", "RDZV_HOST", "RDZV_PORT", "RUN_ROOT", "TRAIN_MODULE"):
        env.pop(key, None)
    env.update(extra)
    return env


def sbatch(tmp_path, name, args, cpus=2, wait=True, background=False, env=None):
    """sbatch (--wait unless wait=False) of the real script from tmp_path (the submit dir);
    background: return the running sbatch process instead of its result."""
    cmd = ["sbatch", *(["--wait"] if wait else []), f"--job-name={name}",
           f"--cpus-per-task={cpus}", str(SBATCH), *map(str, args)]
    if not background:
        return subprocess.run(cmd, cwd=tmp_path, env=env or job_env(), capture_output=True,
                              text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=tmp_path, env=env or job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def job_id_of(name, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True,
                             text=True).stdout.split()
        if out:
            return out[0]
        time.sleep(0.2)
    raise AssertionError(f"job {name} never showed up in squeue")


def job_fields(job_id):
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_done(job_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                      "OUT_OF_MEMORY"):
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job_fields(job_id)}")


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_tiny_bigmac_two_cpu_processes(tmp_path):
    name = unique("tiny")
    # Only the resources differ from a GPU run: 2 CPUs per task -> 2 CPU processes.
    env = job_env()
    env.pop("MEGATRON_BIGMAC_CACHE", None)
    r = sbatch(tmp_path, name, [TINY, "train_iters=4", *TINY_ARGS], cpus=2, env=env)
    job_id = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    log = (tmp_path / f"{name}-{job_id}.out").read_text()
    assert r.returncode == 0, log[-4000:]
    fields = job_fields(job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), fields

    run_dir = tmp_path / "runs" / "slurm" / f"{name}-{job_id}"
    assert "world size 2 (1 node(s) x 2 process(es))" in log
    assert f"rendezvous:  c10d at {fields['BatchHost']}:" in log
    assert "[4/4]" in log  # the trainer's progress line for the last iteration
    assert f"pretrain.sbatch: training finished; checkpoints in runs/slurm/{name}-{job_id}/checkpoints" in log
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (ckpt / "iter_0000004" / "metadata.json").is_file()
    metrics = [json.loads(l) for l in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3, 4]
    assert list((run_dir / "logs").glob("node0/*/attempt_0/1/stdout.log"))  # rank 1's own log
    # The data cache (megatron-core's indices, read by every node) defaults to the shared run dir.
    assert list((run_dir / "cache").rglob("*.npy")), sorted((run_dir / "cache").rglob("*"))


def test_usr1_checkpoints_requeues_and_resumes(tmp_path):
    name = unique("requeue")
    iters = 16
    # Not --wait: sbatch --wait may return as soon as it sees the requeue, with a failed status.
    r = sbatch(tmp_path, name, [TINY, f"train_iters={iters}", *TINY_ARGS], wait=False)
    job_id = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    log_path = tmp_path / f"{name}-{job_id}.out"
    deadline = time.time() + 240
    while not (log_path.exists() and re.search(r"\[ ?3/16\]", log_path.read_text())):
        state = job_fields(job_id).get("JobState")
        assert time.time() < deadline and state in ("PENDING", "RUNNING"), (
            f"training never reached iteration 3 ({state}): "
            f"{log_path.read_text()[-3000:] if log_path.exists() else ''}")
        time.sleep(0.5)
    # What SLURM does before the time limit with --signal=B:USR1@300.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)

    deadline = time.time() + 240
    while True:  # SLURM holds a requeued job for two minutes; a test need not wait that long
        fields = job_fields(job_id)
        if fields.get("Restarts") == "1" and fields.get("JobState") == "PENDING":
            # slurmd refuses a start in the same second as the requeue ("Job credential revoked").
            time.sleep(2.5)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            break
        assert time.time() < deadline and fields.get("JobState") not in ("COMPLETED", "FAILED"), (
            f"job was not requeued: {fields}\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    fields = wait_done(job_id, timeout=300)
    log = log_path.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        f"{fields}\n{log[-4000:]}")

    stopped = int(re.search(r"checkpoint at iteration (\d+) in .*; requeueing job", log).group(1))
    assert 3 <= stopped < iters
    assert "SIGUSR1 (time limit near): asking every node to checkpoint and stop" in log
    assert f"(resuming from runs/slurm/{name}-{job_id}/checkpoints, iteration {stopped})" in log
    run_dir = tmp_path / "runs" / "slurm" / f"{name}-{job_id}"
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    steps = [json.loads(l)["step"] for l in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, iters + 1)), steps  # resumed after `stopped`, nothing repeated
    assert (run_dir / "logs" / "command-restart1.sh").is_file()


def test_bad_input_fails_the_job_with_a_clear_message(tmp_path):
    cases = {  # name: (script arguments, environment, exit code, message in the log)
        "noconfig": (["--nproc=2", "configs/tiny/no_such.yaml"], {}, 2,
                     "pretrain.sbatch: error: config not found: configs/tiny/no_such.yaml"),
        "misfit": ([TINY], {}, 2,
                   "error: 1 node(s) x 3 process(es) = world size 3 is not divisible by "
                   "ETP x EP x PP = 1 x 2 x 1 = 2"),
        "nordzv": (["--nproc=2", TINY], {"RDZV_HOST": "no-such-host.invalid"}, 3,
                   "torchrun.sh: error: rendezvous host 'no-such-host.invalid' does not resolve"),
    }
    jobs = {}
    for key, (args, env, _, _) in cases.items():
        name = unique(key)
        r = sbatch(tmp_path, name, args, cpus=3 if key == "misfit" else 1, wait=False,
                   env=job_env(**env))
        jobs[key] = (name, re.search(r"Submitted batch job (\d+)", r.stdout).group(1))
    for key, (name, job_id) in jobs.items():
        fields = wait_done(job_id, timeout=120)
        log = (tmp_path / f"{name}-{job_id}.out").read_text()
        _, _, code, message = cases[key]
        assert fields["JobState"] == "FAILED", (key, fields, log)
        assert fields["ExitCode"] == f"{code}:0", (key, fields, log)
        assert message in log, (key, log)

"""Launch scripts without SLURM: scripts/torchrun.sh, the dry run of scripts/slurm/pretrain.sbatch,
scripts/launch_plan.py, the Megatron-LM glue (megatron_bigmac/megatron_lm.py) and its patch set.

The Megatron-LM patch is checked against a real checkout when MEGATRON_LM_DIR points to one
(MEGATRON_LM_PYTHON: the interpreter for its --help, default this one); skipped otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "scripts" / "torchrun.sh"
SBATCH = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
APPLY = ROOT / "scripts" / "apply_megatron_lm_patch.sh"
PATCH_DIR = ROOT / "patches" / "megatron-lm" / "core_r0.16.0"
TINY = ROOT / "configs" / "tiny" / "bigmac.yaml"
PAPER_XL = [ROOT / "configs" / "paper" / f"gpt3_xl_{s}.yaml" for s in ("bigmac", "fine_grained", "vanilla")]


def run(cmd, env=None, timeout=120, cwd=ROOT):
    full_env = dict(os.environ, PYTHON=sys.executable)
    for key in ("NPROC", "NNODES", "NODE_RANK", "RDZV_HOST", "RDZV_PORT", "SLURM_JOB_ID",
                "NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
                "MEGATRON_BIGMAC_CACHE"):
        full_env.pop(key, None)
    full_env.update(env or {})
    return subprocess.run([str(c) for c in cmd], env=full_env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def load_launch_plan():
    spec = importlib.util.spec_from_file_location("launch_plan", ROOT / "scripts" / "launch_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ torchrun.sh
def test_torchrun_dry_run_cpu_processes():
    r = run([TORCHRUN_SH, "--dry-run", TINY, "train_iters=5"], env={"NPROC": "2"})
    assert r.returncode == 0, r.stderr
    assert "rendezvous: standalone" in r.stdout
    assert "world size 2 (1 node(s) x 2 process(es))" in r.stdout
    assert "EP=2" in r.stdout and "DP=2 (dense)" in r.stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in r.stdout
    command = r.stdout.split("command:", 1)[1]
    assert "--standalone --nproc-per-node=2" in command
    assert f"-m megatron_bigmac.train --config {TINY} train_iters=5" in command


def test_torchrun_more_processes_than_gpus_stops_a_launch_but_not_a_dry_run():
    """A dry run may describe other nodes (pretrain.sbatch --dry-run on a login node with a GPU)."""
    env = {"NPROC": "2", "CUDA_VISIBLE_DEVICES": "0"}
    r = run([TORCHRUN_SH, "--dry-run", TINY], env=env)
    assert r.returncode == 0, r.stderr
    assert "sees 1 GPU(s): a real launch here would stop" in r.stdout
    r = run([TORCHRUN_SH, TINY], env=env)
    assert r.returncode == 2
    assert "2 processes asked for but only 1 GPU(s) visible on" in r.stderr


def test_torchrun_flag_wins_over_env():
    r = run([TORCHRUN_SH, "--dry-run", "--nproc", "1", TINY, "expert_model_parallel_size=1"],
            env={"NPROC": "2"})
    assert r.returncode == 0, r.stderr
    assert "world size 1 (1 node(s) x 1 process(es))" in r.stdout


def test_torchrun_launches_with_megatron_environment(tmp_path):
    """A real torchrun launch of 2 CPU processes; the module reports its environment."""
    (tmp_path / "env_probe.py").write_text(
        "import os, sys\n"
        "keys = ('RANK', 'WORLD_SIZE', 'CUDA_DEVICE_MAX_CONNECTIONS', 'OMP_NUM_THREADS')\n"
        "line = ' '.join(f'{k}={os.environ.get(k)}' for k in keys) + ' ' + repr(sys.argv[1:])\n"
        f"open(os.path.join({str(tmp_path)!r}, 'probe' + os.environ['RANK']), 'w').write(line)\n"
    )
    r = run([TORCHRUN_SH, TINY, "train_iters=3"], timeout=120,
            env={"NPROC": "2", "TRAIN_MODULE": "env_probe", "PYTHONPATH": str(tmp_path),
                 "CUDA_VISIBLE_DEVICES": ""})  # CPU processes, also on a host with one GPU
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in range(2):
        line = (tmp_path / f"probe{rank}").read_text()
        assert f"RANK={rank} WORLD_SIZE=2 CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=1" in line
        assert f"['--config', '{TINY}', 'train_iters=3']" in line


def test_torchrun_passes_sigusr1_to_the_training_processes_without_procps(tmp_path):
    """SIGUSR1 to torchrun.sh (what SLURM and quality_experiment.sh's timeout send) reaches every
    training process, also where pkill/pgrep are missing (slim GPU images lack procps)."""
    (tmp_path / "signal_probe.py").write_text(
        "import os, signal, time\n"
        f"out = os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'])\n"
        "signal.signal(signal.SIGUSR1, lambda *_: open(out, 'a').write('USR1'))\n"
        "open(out + '.ready', 'w').close()\n"
        "deadline = time.time() + 60\n"
        "while time.time() < deadline and not os.path.exists(out):\n"
        "    time.sleep(0.05)\n"
    )
    no_procps = tmp_path / "bin"
    no_procps.mkdir()
    for tool in ("pkill", "pgrep"):
        (no_procps / tool).write_text("#!/bin/sh\nexit 127\n")
        (no_procps / tool).chmod(0o755)
    # CPU processes: two of them whatever GPUs the machine has.
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2", TRAIN_MODULE="signal_probe",
               PYTHONPATH=str(tmp_path), PATH=f"{no_procps}:{os.environ['PATH']}",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([str(TORCHRUN_SH), str(TINY)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not all((tmp_path / f"rank{r}.ready").exists() for r in range(2)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert "SIGUSR1: asking the training processes to checkpoint and stop" in output
    assert proc.returncode == 0, output
    for rank in range(2):
        assert (tmp_path / f"rank{rank}").read_text() == "USR1"


def sigusr1_to_the_step(args, env: dict, after_s: float) -> tuple:
    """Start torchrun.sh in a process group of its own and send SIGUSR1 to the whole group
    after ``after_s`` seconds, as SLURM signals every process of a job step (not bash alone).
    Returns (exit status, output)."""
    proc = subprocess.Popen([str(TORCHRUN_SH), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        time.sleep(after_s)
        os.killpg(proc.pid, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, output


def test_torchrun_sigusr1_before_the_training_starts(tmp_path):
    """SIGUSR1 while a node waits for the rendezvous host (SLURM's time-limit warning can come
    then): the script, its `sleep` and `timeout` children included, does not die of it (status
    138) but stops without starting the training."""
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHON=sys.executable, NPROC="1", NNODES="2", NODE_RANK="1",
               RDZV_HOST="127.0.0.1", RDZV_PORT=str(port), RDZV_WAIT="60")
    # 3 s: past the config check, into the wait for the rendezvous host
    status, output = sigusr1_to_the_step([TINY], env, after_s=3)
    assert status == 0, output
    assert "SIGUSR1 before the training started: not starting it" in output


def test_torchrun_sigusr1_during_the_config_check(tmp_path):
    """SIGUSR1 while launch_plan.py checks the config: the check ignores it, and the script
    stops without starting the training (it exited 2, silently)."""
    slow_python = tmp_path / "python"
    slow_python.write_text(f"#!/bin/sh\nsleep 3\nexec {sys.executable} \"$@\"\n")
    slow_python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(slow_python), NPROC="1", CUDA_VISIBLE_DEVICES="")
    # 1 s: inside the (3 s slower) config check
    status, output = sigusr1_to_the_step([TINY, "expert_model_parallel_size=1"], env, after_s=1)
    assert status == 0, output
    assert "SIGUSR1 before the training started: not starting it" in output


def test_torchrun_missing_config():
    r = run([TORCHRUN_SH, "configs/tiny/no_such_config.yaml"], env={"NPROC": "2"})
    assert r.returncode != 0
    assert "config not found: configs/tiny/no_such_config.yaml" in r.stderr


def test_torchrun_world_size_must_fit_expert_parallelism():
    r = run([TORCHRUN_SH, "--dry-run", TINY], env={"NPROC": "3"})
    assert r.returncode == 2
    assert "world size 3 is not divisible by ETP x EP x PP = 1 x 2 x 1 = 2" in r.stderr


def test_torchrun_rejects_stray_argument():
    r = run([TORCHRUN_SH, TINY, "train_iters"], env={"NPROC": "2"})
    assert r.returncode == 2 and "'train_iters' is not of the form key=value" in r.stderr


def fake_node(tmp_path, ports, ipoib=""):
    """A fake /sys/class/infiniband (port name -> (state, link layer)) and an `ip` that shows
    `ipoib` as an interface with an IPv4 address; the environment for a 2-node dry run."""
    for port, (state, layer) in ports.items():
        dev, number = port.split(":")
        d = tmp_path / "sys" / "class" / "infiniband" / dev / "ports" / number
        d.mkdir(parents=True)
        (d / "state").write_text(state + "\n")
        (d / "link_layer").write_text(layer + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    line = f"echo '3: {ipoib}    inet 10.0.0.5/16 brd 10.0.255.255 scope global {ipoib}'" if ipoib else ""
    (bin_dir / "ip").write_text(f"#!/bin/sh\n{line}\n")
    (bin_dir / "ip").chmod(0o755)
    return {"BIGMAC_TEST_SYSFS": str(tmp_path / "sys"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "NNODES": "2", "NODE_RANK": "0", "RDZV_HOST": "localhost", "NPROC": "1"}


def test_torchrun_picks_only_infiniband_ports(tmp_path):
    """A DGX-like node: InfiniBand compute HCAs, mlx5 NICs in Ethernet mode (storage), a port
    down. Only the active InfiniBand ports go to NCCL, and no GID index is set."""
    ports = {f"mlx5_{i}:1": ("4: ACTIVE", "InfiniBand") for i in range(4)}
    ports.update({"mlx5_8:1": ("4: ACTIVE", "Ethernet"), "mlx5_9:1": ("1: DOWN", "InfiniBand")})
    r = run([TORCHRUN_SH, "--dry-run", TINY], env=fake_node(tmp_path, ports, ipoib="ibp24s0"))
    assert r.returncode == 0, r.stderr
    assert ("auto: NCCL_IB_HCA==mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1 (active InfiniBand ports; "
            "not the Ethernet/RoCE ports mlx5_8:1)") in r.stdout
    assert "auto: NCCL_SOCKET_IFNAME=ibp24s0 (IPoIB)" in r.stdout
    assert "GID_INDEX" not in r.stdout


def test_torchrun_leaves_roce_only_nodes_to_nccl(tmp_path):
    ports = {"mlx5_0:1": ("4: ACTIVE", "Ethernet"), "mlx5_1:1": ("4: ACTIVE", "Ethernet")}
    r = run([TORCHRUN_SH, "--dry-run", TINY], env=fake_node(tmp_path, ports))
    assert r.returncode == 0, r.stderr
    assert "auto:" not in r.stdout


def test_unresolvable_rendezvous_host():
    r = run([TORCHRUN_SH, TINY], env={"NPROC": "1", "NNODES": "2", "NODE_RANK": "1",
                                      "RDZV_HOST": "no-such-host.invalid"})
    assert r.returncode == 3
    assert "rendezvous host 'no-such-host.invalid' does not resolve" in r.stderr


def test_unreachable_rendezvous_port():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run([TORCHRUN_SH, TINY], timeout=60,
            env={"NPROC": "1", "NNODES": "2", "NODE_RANK": "1", "RDZV_HOST": "127.0.0.1",
                 "RDZV_PORT": str(port), "RDZV_WAIT": "2"})
    assert r.returncode == 3
    assert f"cannot reach the rendezvous host 127.0.0.1:{port}" in r.stderr


# ------------------------------------------------------------------------------ sbatch dry run
@pytest.mark.parametrize("config", PAPER_XL, ids=lambda p: p.stem)
def test_sbatch_dry_run_paper_config_on_4x8(config):
    if not config.exists():
        pytest.skip(f"{config.relative_to(ROOT)} not present")
    r = run([SBATCH, "--dry-run", "--nodes=4", "--gpus-per-node=8", "--nodelist=gpu[01-04]",
             config.relative_to(ROOT)])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nodes:       4 (gpu01 gpu02 gpu03 gpu04), 8 process(es) per node" in out
    assert "world size 32 (4 node(s) x 8 process(es))" in out
    assert "TP=4 PP=1 CP=1 EP=4 ETP=4 -> DP=8 (dense), expert DP=2" in out
    assert "rendezvous:  c10d at gpu01:29500" in out
    per_node = out.split("per-node command", 1)[1]
    assert "--nnodes=4 --rdzv-backend=c10d --rdzv-endpoint=gpu01:29500" in per_node
    assert "--nproc-per-node=8" in per_node
    assert "save=runs/slurm/bigmac-JOBID/checkpoints" in per_node
    assert "srun --nodes=4 --ntasks=4 --ntasks-per-node=1" in out
    assert "dry run: nothing launched" in out


def test_sbatch_dry_run_without_nodelist_names_the_first_node():
    r = run([SBATCH, "--dry-run", "--nodes=2", "--nproc=2", TINY, "global_batch_size=32"])
    assert r.returncode == 0, r.stderr
    assert "world size 4 (2 node(s) x 2 process(es))" in r.stdout
    assert "rendezvous:  c10d at <first node>:29500" in r.stdout


def test_sbatch_data_cache_is_in_the_run_dir_unless_set():
    """megatron-core's indices, written by rank 0 and read by every node, go to the shared run
    dir rather than the trainer's default ~/.cache (node-local on many clusters)."""
    r = run([SBATCH, "--dry-run", "--nodes=2", "--nproc=1", TINY])
    assert r.returncode == 0, r.stderr
    assert "data cache:  runs/slurm/bigmac-JOBID/cache (MEGATRON_BIGMAC_CACHE" in r.stdout
    assert "note:" not in r.stdout  # torchrun.sh sees the cache set
    r = run([SBATCH, "--dry-run", "--nodes=2", "--nproc=1", TINY],
            env={"MEGATRON_BIGMAC_CACHE": "/shared/cache"})
    assert "data cache:  /shared/cache (MEGATRON_BIGMAC_CACHE" in r.stdout


def test_torchrun_multi_node_notes_an_unshared_data_cache():
    env = {"NNODES": "2", "NODE_RANK": "0", "RDZV_HOST": "localhost", "NPROC": "1"}
    r = run([TORCHRUN_SH, "--dry-run", TINY], env=env)
    assert r.returncode == 0, r.stderr
    assert "note: neither MEGATRON_BIGMAC_CACHE nor data_cache_path is set" in r.stdout
    for extra, more_env in ((["data_cache_path=/shared/cache"], {}), ([], {"MEGATRON_BIGMAC_CACHE": "/shared"})):
        r = run([TORCHRUN_SH, "--dry-run", TINY, *extra], env={**env, **more_env})
        assert r.returncode == 0 and "note:" not in r.stdout, r.stdout + r.stderr


def test_sbatch_dry_run_node_count_that_does_not_fit():
    config = PAPER_XL[0] if PAPER_XL[0].exists() else TINY
    extra = [] if config != TINY else ["tensor_model_parallel_size=4", "expert_model_parallel_size=4",
                                       "num_attention_heads=4", "num_experts=8"]
    r = run([SBATCH, "--dry-run", "--nodes=3", "--gpus-per-node=8", config, *extra])
    assert r.returncode == 2
    assert ("world size 24 is not divisible by ETP x EP x PP = 4 x 4 x 1 = 16 "
            "(megatron-core's expert groups); with 8 per node, 2 or 4 or 6 node(s) fit") in r.stderr


@pytest.mark.parametrize("gpus", ["h100:8", "gpu:h100:8"])
def test_sbatch_dry_run_typed_gpus_per_node(gpus):
    """SLURM's TYPE:COUNT form of --gpus-per-node gives COUNT processes per node."""
    r = run([SBATCH, "--dry-run", "--nodes=2", f"--gpus-per-node={gpus}", TINY,
             "global_batch_size=128"])
    assert r.returncode == 0, r.stderr
    assert "nodes:       2 (<allocation>), 8 process(es) per node" in r.stdout


def test_sbatch_rejects_a_gpu_count_that_is_not_one():
    r = run([SBATCH, "--dry-run", "--gpus-per-node=h100", TINY])
    assert r.returncode == 2
    assert "--gpus-per-node: expected a count (or TYPE:COUNT), got 'h100'" in r.stderr


def test_sbatch_save_and_log_dir_of_the_user_win():
    """Keys are read as the trainer reads them (log-dir is log_dir), so the job's own
    save=/log_dir= do not silently replace the user's."""
    r = run([SBATCH, "--dry-run", "--nodes=2", "--nproc=1", TINY, "save=/x/ckpt", "log-dir=/x/logs"])
    assert r.returncode == 0, r.stderr
    srun = r.stdout.split("srun:", 1)[1].splitlines()[0]
    assert srun.endswith(" save=/x/ckpt log-dir=/x/logs"), srun


def test_sbatch_after_a_sigterm_says_stopped_not_failed(tmp_path):
    """A job SLURM terminates (preemption, scancel: SIGTERM to every process of the job) ends
    with "stopped by SIGTERM", not "training failed": torchrun exits 1 after a signal even when
    its workers saved. SLURM is faked: scontrol, and an srun that exits 1 on SIGTERM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$2\" = hostnames ] && echo localhost\nexit 0\n")
    # srun waits a moment for its step (torchrun: the workers' checkpoint), then exits 1.
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntrap 'sleep 0.5; exit 1' TERM\ntouch {tmp_path}/running\n"
                                  "sleep 60 & wait\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{bin_dir}:{os.environ['PATH']}",
               SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1",
               SLURM_SUBMIT_DIR=str(tmp_path), NPROC="2")
    proc = subprocess.Popen([str(SBATCH), str(TINY)], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "running").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, output
    assert output.strip().splitlines()[-1] == (
        "pretrain.sbatch: stopped by SIGTERM (preemption or scancel), exit status 1; last "
        "checkpoint: iteration none in runs/slurm/bigmac-7/checkpoints"), output


def test_sbatch_missing_config():
    r = run([SBATCH, "--dry-run", "configs/paper/no_such.yaml"])
    assert r.returncode == 2 and "config not found: configs/paper/no_such.yaml" in r.stderr


def test_sbatch_outside_an_allocation_needs_dry_run():
    r = run([SBATCH, TINY])
    assert r.returncode == 2 and "not inside a SLURM allocation" in r.stderr


# ------------------------------------------------------------------------------ launch_plan.py
def test_plan_follows_extends_and_overrides(tmp_path):
    lp = load_launch_plan()
    (tmp_path / "base.yaml").write_text("tensor_model_parallel_size: 2\nnum_experts: 8\n")
    (tmp_path / "run.yaml").write_text("extends: base.yaml\nexpert_model_parallel_size: 2\n")
    cfg = lp.load_config(str(tmp_path / "run.yaml"), ["expert_model_parallel_size=4", "lr=1.0e-3"])
    assert cfg["tensor_model_parallel_size"] == 2 and cfg["expert_model_parallel_size"] == 4
    assert cfg["lr"] == 1e-3
    p = lp.plan(cfg, nnodes=2, nproc_per_node=8)
    assert (p["world_size"], p["dp"], p["ep"], p["etp"], p["expert_dp"]) == (16, 8, 4, 2, 2)


@pytest.mark.parametrize("cfg,message", [
    ({"tensor_model_parallel_size": 3}, "not divisible by TP x PP x CP = 3 x 1 x 1 = 3"),
    ({"expert_model_parallel_size": 4, "num_experts": 6}, "num_experts=6 is not divisible by expert_model_parallel_size=4"),
    ({"tensor_model_parallel_size": 4, "num_attention_heads": 6}, "num_attention_heads=6 is not divisible"),
    ({"micro_batch_size": 4, "global_batch_size": 36}, "global_batch_size=36 is not divisible by micro_batch_size x DP = 4 x 8"),
    ({"tensor_model_parallel_size": "four"}, "tensor_model_parallel_size: expected an integer"),
    ({"tensor_model_parallel_size": 2.5}, "tensor_model_parallel_size: expected an integer"),
])
def test_plan_rejects(cfg, message):
    lp = load_launch_plan()
    with pytest.raises(lp.PlanError, match=re.escape(message)):
        lp.plan(cfg, nnodes=1, nproc_per_node=8)


def test_plan_reads_overrides_like_the_trainer():
    """Integers written as floats or 1e3, and values YAML cannot parse, as the trainer takes them."""
    lp = load_launch_plan()
    cfg = lp.load_config(str(TINY), ["global_batch_size=1.6e+1", "micro_batch_size=8.0",
                                     "train_iters=1e3", "save=@ckpt", "log-dir=%runs"])
    assert (cfg["save"], cfg["log_dir"]) == ("@ckpt", "%runs")
    p = lp.plan(cfg, nnodes=1, nproc_per_node=2)
    assert (p["global_batch_size"], p["micro_batch_size"], p["train_iters"]) == (16, 8, 1000)


def test_plan_follows_extends_of_a_config_reached_through_a_symlink(tmp_path):
    """extends is relative to the real file, as in the trainer (configs/small/fine_grained.yaml
    extends base.yaml)."""
    lp = load_launch_plan()
    (tmp_path / "my_run.yaml").symlink_to(ROOT / "configs" / "small" / "fine_grained.yaml")
    cfg = lp.load_config(str(tmp_path / "my_run.yaml"))
    assert cfg == lp.load_config(str(ROOT / "configs" / "small" / "fine_grained.yaml"))
    assert cfg["moe_structure"] == "fine_grained" and "num_layers" in cfg  # from base.yaml


@pytest.mark.parametrize("text", ["num_layers: [2,\n", "- a list\n"])
def test_launcher_config_errors_are_one_line(tmp_path, text):
    (tmp_path / "bad.yaml").write_text(text)
    r = run([TORCHRUN_SH, "--dry-run", tmp_path / "bad.yaml"], env={"NPROC": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: config: "), r.stderr


def test_one_node_hint_names_process_counts():
    r = run([TORCHRUN_SH, "--dry-run", TINY], env={"NPROC": "1"})
    assert r.returncode == 2
    assert "2 or 4 or 6 node(s) fit, or 2 or 4 or 6 process(es) on one node (--nproc/NPROC)" in r.stderr


def test_expand_nodelist_like_scontrol():
    lp = load_launch_plan()
    assert lp.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert lp.expand_nodelist("a[1-2]b[3-4]") == ["a1b3", "a1b4", "a2b3", "a2b4"]


# ------------------------------------------------------------------------------ Megatron-LM glue
def test_add_bigmac_args_and_chaining():
    from megatron_bigmac.megatron_lm import add_bigmac_args

    chained = []

    def other(parser):
        chained.append(True)
        parser.add_argument("--other", type=int, default=0)
        return parser

    parser = add_bigmac_args(argparse.ArgumentParser(), then=other)
    args = parser.parse_args(["--moe-structure", "bigmac", "--moe-low-rank-ratio", "0.5",
                              "--moe-expert-activation", "relu", "--moe-latent-init", "megatron",
                              "--other", "3"])
    assert (args.moe_structure, args.moe_low_rank_ratio, args.moe_expert_activation,
            args.moe_latent_init, args.other) == ("bigmac", 0.5, "relu", "megatron", 3)
    assert chained == [True]
    defaults = add_bigmac_args(argparse.ArgumentParser()).parse_args([])
    assert (defaults.moe_structure, defaults.moe_low_rank_ratio, defaults.moe_expert_activation,
            defaults.moe_latent_init) == (None, 0.25, "gelu", "variance_preserving")
    with pytest.raises(SystemExit):
        add_bigmac_args(argparse.ArgumentParser()).parse_args(["--moe-structure", "dense"])


def _megatron_args(**overrides):
    """The attributes of Megatron-LM's parsed args that the glue and the fake config reader use."""
    values = dict(moe_structure="bigmac", moe_low_rank_ratio=0.25, moe_expert_activation="gelu",
                  moe_latent_init="variance_preserving",
                  num_experts=8, moe_router_topk=2, num_layers=2, hidden_size=64,
                  num_attention_heads=4, ffn_hidden_size=256, moe_ffn_hidden_size=256,
                  normalization="LayerNorm", spec=None, mtp_num_layers=None,
                  multi_latent_attention=False, heterogeneous_layers_config_path=None,
                  moe_layer_freq=1, use_cpu_initialization=True)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def _config_from_args(args, config_class=None):
    """Stands in for Megatron-LM's core_transformer_config_from_args: every dataclass field the
    args carry (plus num_experts -> num_moe_experts), as Megatron-LM does."""
    import dataclasses

    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
              if hasattr(args, f.name)}
    kwargs["num_moe_experts"] = args.num_experts
    return config_class(**kwargs)


def test_bigmac_builder_hands_config_and_spec_to_megatron_lm():
    from megatron.core.transformer.spec_utils import import_module

    import megatron_bigmac.megatron_lm as glue
    from megatron_bigmac.config import BigMacConfig
    from megatron_bigmac.moe import BigMacMoELayer

    seen = {}

    def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        seen["config"] = config
        seen["spec"] = import_module(args.spec)  # what Megatron-LM's gpt_builder does with --spec
        return "model"

    build = glue.bigmac_builder(gpt_builder, config_from_args=_config_from_args)
    args = _megatron_args()
    assert build(args, True, True) == "model"
    config = seen["config"]
    assert isinstance(config, BigMacConfig) and config.moe_structure == "bigmac"
    # --moe-ffn-hidden-size was not on the command line: the structure's width (h), not 4h.
    assert config.moe_ffn_hidden_size == 64 and args.moe_ffn_hidden_size == 64
    assert seen["spec"].submodules.mlp.module is BigMacMoELayer
    assert args.spec is None  # restored after the build


def test_bigmac_builder_refuses_a_spec_of_the_users():
    import megatron_bigmac.megatron_lm as glue

    build = glue.bigmac_builder(lambda *a, **k: "model", config_from_args=_config_from_args)
    args = _megatron_args(spec=["my_layers", "spec"])
    with pytest.raises(ValueError, match="--moe-structure does not combine with --spec"):
        build(args, True, True)
    assert args.spec == ["my_layers", "spec"]


def test_bigmac_builder_without_structure_is_megatron_lm_unchanged():
    import megatron_bigmac.megatron_lm as glue

    calls = []
    build = glue.bigmac_builder(lambda *a, **k: calls.append((a, k)) or "stock",
                                config_from_args=_config_from_args)
    args = _megatron_args(moe_structure=None)
    assert build(args, True, False, 1, config="cfg", pg_collection="pg") == "stock"
    assert calls == [((args, True, False, 1), {"config": "cfg", "pg_collection": "pg"})]


def test_bigmac_config_from_args_errors_and_explicit_ffn():
    import megatron_bigmac.megatron_lm as glue

    with pytest.raises(ValueError, match="--moe-structure needs --num-experts"):
        glue.bigmac_config_from_args(_megatron_args(num_experts=None), _config_from_args, argv=[])
    config = glue.bigmac_config_from_args(
        _megatron_args(moe_structure="fine_grained", moe_ffn_hidden_size=32), _config_from_args,
        argv=["--moe-ffn-hidden-size", "32"])
    assert config.moe_ffn_hidden_size == 32
    config = glue.bigmac_config_from_args(_megatron_args(moe_structure="fine_grained"),
                                          _config_from_args, argv=[])
    assert config.moe_ffn_hidden_size == 16  # r*h


@pytest.mark.parametrize("flag", ["--swiglu", "--quick-geglu", "--squared-relu"])
def test_bigmac_config_from_args_refuses_activation_flags_the_experts_ignore(flag):
    """The experts read --moe-expert-activation only: --swiglu would build gelu experts while
    Megatron-LM logged (and counted FLOPs for) gated ones."""
    import megatron_bigmac.megatron_lm as glue

    args = _megatron_args(**{flag[2:].replace("-", "_"): True})
    with pytest.raises(ValueError, match=f"--moe-structure: {flag} does not reach the experts; "
                                         "use --moe-expert-activation"):
        glue.bigmac_config_from_args(args, _config_from_args, argv=[])


def test_bigmac_config_from_args_refuses_kv_channels_other_than_the_head_width():
    import megatron_bigmac.megatron_lm as glue

    # Megatron-LM's validate_args sets kv_channels = h / heads (64 / 4) when not given.
    config = glue.bigmac_config_from_args(_megatron_args(kv_channels=16), _config_from_args, argv=[])
    assert config.kv_channels == 16
    with pytest.raises(ValueError, match=r"--kv-channels = hidden_size / num_attention_heads "
                                         r"\(16\) only, got 32"):
        glue.bigmac_config_from_args(_megatron_args(kv_channels=32), _config_from_args, argv=[])


def test_bigmac_config_from_args_takes_a_moe_layer_freq_that_means_every_layer():
    import megatron_bigmac.megatron_lm as glue

    for freq in (1, [1, 1]):  # Megatron-LM parses --moe-layer-freq "[1,1]" into a list
        glue.bigmac_config_from_args(_megatron_args(moe_layer_freq=freq), _config_from_args, argv=[])
    for freq in (2, [1, 0]):
        with pytest.raises(ValueError, match="leave --moe-layer-freq at 1"):
            glue.bigmac_config_from_args(_megatron_args(moe_layer_freq=freq), _config_from_args,
                                         argv=[])


def _paper_args(structure):
    """Megatron-LM's parsed args for the paper's GPT3-XL (docs/launch.md's command), as the
    training loop sees them once bigmac_builder has set the experts' width."""
    from megatron_bigmac import costs

    shape = costs.paper_shape(structure)
    return _megatron_args(moe_structure=structure, num_layers=24, hidden_size=2048,
                          num_attention_heads=16, seq_length=2048, padded_vocab_size=50304,
                          num_experts=shape.num_experts, moe_router_topk=shape.topk,
                          moe_ffn_hidden_size=shape.expert_ffn_hidden_size, swiglu=False,
                          group_query_attention=False, num_query_groups=16, add_bias_linear=False)


@pytest.mark.parametrize("structure", ["bigmac", "fine_grained", "vanilla"])
def test_flops_count_is_costs_for_every_structure(structure):
    """What Megatron-LM's loop logs (--log-throughput) with --moe-structure: costs' count, not
    Megatron-LM's h x moe_ffn_hidden_size experts (2x BigMac's)."""
    from megatron_bigmac import costs
    from megatron_bigmac.megatron_lm import num_floating_point_operations

    def megatron_count(args, batch_size):
        raise AssertionError("Megatron-LM's count used with --moe-structure")

    flops = num_floating_point_operations(_paper_args(structure), 256, megatron_count)
    assert flops == costs.training_flops_per_iteration(costs.paper_shape(structure), 256)
    if structure == "bigmac":
        assert round(flops / 1e12, 2) == 3649.00  # the paper's Table 4


def test_flops_count_without_structure_is_megatron_lms():
    from megatron_bigmac.megatron_lm import num_floating_point_operations

    args = _megatron_args(moe_structure=None)
    assert num_floating_point_operations(args, 8, lambda a, b: ("megatron", a, b)) == ("megatron", args, 8)


def test_bigmac_builder_makes_megatron_lm_count_flops_with_costs(monkeypatch):
    """The training loop calls megatron.training.training.num_floating_point_operations by name:
    building a --moe-structure model replaces it once; a stock build leaves it alone."""
    import megatron_bigmac.megatron_lm as glue

    def megatron_count(args, batch_size):
        return "megatron"

    training = types.ModuleType("megatron.training.training")
    training.num_floating_point_operations = megatron_count
    monkeypatch.setitem(sys.modules, "megatron.training.training", training)
    build = glue.bigmac_builder(lambda *a, **k: "model", config_from_args=_config_from_args)
    build(_megatron_args(moe_structure=None), True, True)
    assert training.num_floating_point_operations is megatron_count
    for _ in range(2):  # the model of every virtual pipeline stage is built
        build(_megatron_args(), True, True)
    count = training.num_floating_point_operations
    assert count.func is glue.num_floating_point_operations and count.keywords == {"megatron_count": megatron_count}
    assert count(_megatron_args(moe_structure=None), 4) == "megatron"
    args = _megatron_args(seq_length=32, padded_vocab_size=128, moe_ffn_hidden_size=64)
    assert count(args, 4) == glue.num_floating_point_operations(args, 4)


# ------------------------------------------------------------------------------ the patch set
def test_patch_set_is_small_and_touches_only_pretrain_gpt():
    patches = sorted(PATCH_DIR.glob("*.patch"))
    assert patches, f"no patches in {PATCH_DIR}"
    for patch in patches:
        text = patch.read_text()
        files = re.findall(r"^diff --git a/(\S+) b/", text, flags=re.M)
        assert files == ["pretrain_gpt.py"], files
        changed = [l for l in text.splitlines()
                   if l[:1] in "+-" and not l.startswith(("+++", "---"))]
        assert len(changed) <= 15, f"{patch.name}: {len(changed)} changed lines"
        assert "megatron_bigmac.megatron_lm" in text


def test_apply_script_rejects_a_directory_that_is_not_megatron_lm(tmp_path):
    r = run([APPLY, "--check", tmp_path])
    assert r.returncode == 2 and "is not a Megatron-LM checkout" in r.stderr


def test_apply_script_rejects_an_unsupported_release(tmp_path):
    (tmp_path / "megatron" / "core").mkdir(parents=True)
    (tmp_path / "pretrain_gpt.py").write_text("")
    (tmp_path / "megatron" / "core" / "package_info.py").write_text("MAJOR = 0\nMINOR = 9\nPATCH = 0\n")
    r = run([APPLY, "--check", tmp_path])
    assert r.returncode == 2
    assert "no patch set for Megatron-LM 0.9.0 (release line core_r0.9.0); supported: core_r0.16.0" in r.stderr


@pytest.mark.parametrize("reverse", [False, True])
def test_apply_script_on_a_changed_pretrain_gpt(tmp_path, reverse):
    """A 0.16 checkout whose pretrain_gpt.py the patch does not fit: git's hunk message, then
    one error line (without the exit status in it), status 1."""
    (tmp_path / "megatron" / "core").mkdir(parents=True)
    (tmp_path / "pretrain_gpt.py").write_text("print('changed')\n")
    (tmp_path / "megatron" / "core" / "package_info.py").write_text("MAJOR = 0\nMINOR = 16\nPATCH = 1\n")
    r = run([APPLY, *(["--reverse"] if reverse else []), tmp_path])
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    if reverse:
        assert last.endswith(f"cannot be taken out of {tmp_path}: was pretrain_gpt.py changed after the patch?"), last
    else:
        assert last.endswith(f"does not apply to {tmp_path}: is it a clean core_r0.16.0 checkout?"), last


@pytest.fixture(scope="module")
def megatron_lm_copy(tmp_path_factory):
    source = os.environ.get("MEGATRON_LM_DIR")
    if not source:
        pytest.skip("MEGATRON_LM_DIR is not set: the patch is checked only against a Megatron-LM "
                    "checkout (e.g. git clone -b core_r0.16.0 <Megatron-LM> and point it there)")
    if not (Path(source) / "pretrain_gpt.py").is_file():
        pytest.fail(f"MEGATRON_LM_DIR={source} has no pretrain_gpt.py")
    copy = tmp_path_factory.mktemp("megatron-lm") / "Megatron-LM"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".git"), symlinks=True)
    return copy


def test_patch_applies_to_megatron_lm(megatron_lm_copy):
    r = run([APPLY, "--check", megatron_lm_copy])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "applies cleanly" in r.stdout or "already applied" in r.stdout
    r = run([APPLY, megatron_lm_copy])
    assert r.returncode == 0, r.stdout + r.stderr
    again = run([APPLY, megatron_lm_copy])
    assert again.returncode == 0 and "already applied" in again.stdout


def assert_megatron_lm_ran(r: subprocess.CompletedProcess, what: str) -> None:
    """A Megatron-LM script's run succeeded; skipped when it failed on a package Megatron-LM
    needs that this Python lacks (e.g. triton), not on Megatron-LM or this project."""
    missing = re.search(r"No module named '([^']+)'", r.stderr)
    if r.returncode != 0 and missing and not missing.group(1).startswith("megatron"):
        pytest.skip(f"Megatron-LM's {what} needs the package '{missing.group(1)}' to import; "
                    "install it or set MEGATRON_LM_PYTHON")
    assert r.returncode == 0, r.stderr[-3000:]


def test_patched_pretrain_gpt_help_lists_the_arguments(megatron_lm_copy):
    run([APPLY, megatron_lm_copy])
    python = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
    r = run([python, "pretrain_gpt.py", "--help"], cwd=megatron_lm_copy, timeout=300,
            env={"PYTHONPATH": str(ROOT)})
    assert_megatron_lm_ran(r, "pretrain_gpt.py (its --help too)")
    for flag in ("--moe-structure {bigmac,fine_grained,vanilla}", "--moe-low-rank-ratio",
                 "--moe-expert-activation", "--moe-latent-init"):
        assert flag in r.stdout
    assert "--tensor-model-parallel-size" in r.stdout  # Megatron-LM's own arguments are still there


MEGATRON_LM_BUILD = '''
import os, sys
mlm, structure = sys.argv[1], sys.argv[2]
sys.path.insert(0, mlm)
import torch
import megatron_bigmac  # noqa: F401  (the project's megatron-core shims, as pretrain_gpt.py gets them)
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.training.arguments import parse_args, validate_args
from megatron.training.global_vars import set_args
from gpt_builders import gpt_builder
from megatron_bigmac.megatron_lm import add_bigmac_args, bigmac_builder
sys.argv = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--global-batch-size", "2", "--num-experts", "4", "--moe-router-topk", "2",
    "--moe-structure", structure, "--moe-low-rank-ratio", "0.25", "--transformer-impl", "local",
    "--use-cpu-initialization", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--mock-data", "--train-iters", "1", "--moe-token-dispatcher-type", "alltoall",
    "--no-gradient-accumulation-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
    "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-persist-layer-norm"]
args = parse_args(add_bigmac_args)
validate_args(args, {})
args.padded_vocab_size = 128
set_args(args)
torch.distributed.init_process_group("gloo", world_size=1, rank=0)
parallel_state.initialize_model_parallel()
model_parallel_cuda_manual_seed(1)
model = bigmac_builder(gpt_builder)(args, True, True)
tokens = torch.randint(0, 128, (2, 32))
loss = model(tokens, torch.arange(32).expand(2, 32),
             torch.triu(torch.ones(1, 1, 32, 32, dtype=torch.bool), 1), labels=tokens)
loss.float().mean().backward()
print("built", type(model.config).__name__, model.config.moe_structure,
      type(model.decoder.layers[0].mlp).__name__, model.config.moe_ffn_hidden_size,
      torch.isfinite(loss).all().item())
# What Megatron-LM's training loop logs as throughput, against costs for the model just built.
from megatron.training import training
from megatron_bigmac import costs
shape = costs.MoEModelShape.from_config(model.config, seq_length=32, padded_vocab_size=128)
print("flops", training.num_floating_point_operations(args, 2),
      costs.training_flops_per_iteration(shape, 2))
'''


DOCS_COMMAND_CHECK = r'''
import shlex, sys
mlm, docs = sys.argv[1], sys.argv[2]
sys.path.insert(0, mlm)
import megatron_bigmac  # noqa: F401
from megatron.training import arguments
from megatron.training.arguments import parse_args, validate_args
from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding
arguments.get_device_arch_version = lambda: 9  # validate_args asks GPU 0 (TP > 1): say Hopper
from megatron_bigmac.megatron_lm import add_bigmac_args, bigmac_config_from_args, num_floating_point_operations
command = open(docs).read().split("Megatron-LM/pretrain_gpt.py \\\n", 1)[1].split("```", 1)[0]
lines = [line.split("#", 1)[0].rstrip().rstrip("\\") for line in command.splitlines()]
sys.argv = ["pretrain_gpt.py", *shlex.split(" ".join(lines))]
args = parse_args(add_bigmac_args)
validate_args(args, {})
args.padded_vocab_size = _vocab_size_with_padding(50257, args, logging_enabled=False)
config = bigmac_config_from_args(args, argv=sys.argv[1:])
print("vocab", args.padded_vocab_size, "flops", num_floating_point_operations(args, args.global_batch_size),
      "structure", config.moe_structure, "ffn", config.moe_ffn_hidden_size, "world", args.world_size)
'''


def test_docs_gpt3_xl_command_is_the_papers_model_in_megatron_lm(megatron_lm_copy, tmp_path):
    """docs/launch.md's Megatron-LM command, through Megatron-LM's own parse_args and
    validate_args on 32 ranks: Table 4's padded vocabulary (50,304) and FLOPs (3,649.00 T)."""
    script = tmp_path / "docs_command.py"
    script.write_text(DOCS_COMMAND_CHECK)
    python = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
    r = run([python, script, megatron_lm_copy, ROOT / "docs" / "launch.md"], cwd=ROOT,
            timeout=300, env={"PYTHONPATH": str(ROOT), "WORLD_SIZE": "32", "RANK": "0",
                              "CUDA_DEVICE_MAX_CONNECTIONS": "1"})  # as torchrun.sh sets it
    assert_megatron_lm_ran(r, "training package")
    vocab, flops, structure, ffn, world = re.search(
        r"^vocab (\d+) flops (\S+) structure (\w+) ffn (\d+) world (\d+)$", r.stdout,
        flags=re.M).groups()
    assert (int(vocab), structure, int(ffn), int(world)) == (50304, "bigmac", 2048, 32)
    assert round(float(flops) / 1e12, 2) == 3649.00


@pytest.mark.parametrize("structure,layer,ffn", [("bigmac", "BigMacMoELayer", 64),
                                                  ("fine_grained", "GroupedMoELayer", 16),
                                                  ("vanilla", "GroupedMoELayer", 256)])
def test_megatron_lm_arguments_build_and_run_the_model(megatron_lm_copy, tmp_path, structure,
                                                       layer, ffn):
    """Megatron-LM's own parse_args/validate_args/core_transformer_config_from_args/gpt_builder
    with the glue: one forward and backward on CPU (1 process, gloo), and Megatron-LM's FLOPs
    count (its logged throughput) equal to costs' for the model built."""
    script = tmp_path / "build.py"
    script.write_text(MEGATRON_LM_BUILD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    python = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
    r = run([python, script, megatron_lm_copy, structure], cwd=tmp_path, timeout=300,
            env={"PYTHONPATH": str(ROOT), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert_megatron_lm_ran(r, "training package")
    assert f"built BigMacConfig {structure} {layer} {ffn} True" in r.stdout
    logged, own = re.search(r"^flops (\S+) (\S+)$", r.stdout, flags=re.M).groups()
    assert float(logged) == float(own) > 0

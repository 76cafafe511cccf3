"""The pretraining runner end to end on CPU: `python -m megatron_bigmac.train` under torchrun, 2 gloo
processes with expert parallelism 2, on the shipped enwiki sample (tokenized once into a temporary
cache).

Runs share one schedule (lr_decay_iters=30), so a 15-iteration run follows the first 15 iterations
of a 30-iteration one. Stated margins and tolerances:

* every structure: validation loss at iteration 30 at least 1.0 nat below iteration 0's;
* the same seed twice: identical losses (bitwise: same code, same host);
* EP=2 vs EP=1 (same model, experts sharded vs replicated): losses within 1e-5 relative;
* save at 15, resume to 30: iterations 16..30 identical to the uninterrupted run, dropout on;
* the committed curve tests/assets/losses/tiny_bigmac.txt: within 2e-3 absolute (other CPUs
  round differently); `UPDATE_LOSS_CURVES=1 pytest tests/test_training.py` rewrites it, and a
  change that moves it needs a reason in its commit.

Config checks and the paper configs' parameter counts run in-process, without process groups.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
PAPER = ROOT / "configs" / "paper"
CURVE = ROOT / "tests" / "assets" / "losses" / "tiny_bigmac.txt"
STRUCTURES = ("bigmac", "fine_grained", "vanilla")

# Dropout on (so resuming must restore the RNG), a short warmup, one schedule for every run.
COMMON = ("lr_warmup_iters=5", "lr_decay_iters=30", "log_interval=1", "eval_interval=15",
          "eval_iters=2", "hidden_dropout=0.1", "attention_dropout=0.1")
VAL_LOSS_MARGIN = 1.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train_records(cache: Path, out: Path, *overrides: str, config: str = "bigmac", nproc: int = 2):
    """Run the trainer CLI; return (train records by step, eval records by step, stdout)."""
    env = dict(os.environ, MEGATRON_BIGMAC_CACHE=str(cache), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_bigmac.train", "--config", str(TINY / f"{config}.yaml"), *COMMON,
           f"log_dir={out}", *overrides]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = lambda kind: {r["step"]: r for r in records if r["kind"] == kind}
    return by_step("train"), by_step("eval"), r.stdout


def train(cache: Path, out: Path, config: str = "bigmac", *overrides: str, nproc: int = 2):
    """Run the trainer CLI; return (train losses by step, eval losses by step, stdout)."""
    steps, evals, stdout = train_records(cache, out, *overrides, config=config, nproc=nproc)
    loss = lambda records: {step: r["lm_loss"] for step, r in records.items()}
    return loss(steps), loss(evals), stdout


@pytest.fixture(scope="module")
def bigmac_run(cache, tmp_path_factory):
    """The reference run: 30 iterations of tiny BigMac, saving at 15 and 30."""
    out = tmp_path_factory.mktemp("bigmac")
    losses, evals, stdout = train(cache, out, "bigmac", "train_iters=30", f"save={out}",
                                  "save_interval=15")
    return out, losses, evals, stdout


# ------------------------------------------------------------------------------ end to end
def test_bigmac_trains_and_validation_loss_drops(bigmac_run):
    out, losses, evals, stdout = bigmac_run
    assert sorted(losses) == list(range(1, 31))
    assert sorted(evals) == [0, 15, 30]
    assert evals[30] < evals[0] - VAL_LOSS_MARGIN, evals
    assert all(math.isfinite(v) for v in losses.values())
    # The console shows progress and perplexity; the checkpoints are complete.
    assert "validation: loss" in stdout and "perplexity" in stdout and "ETA" in stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (out / "iter_0000015" / "metadata.json").is_file()
    assert not list(out.glob("*.tmp"))
    assert "num_experts: 8" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("structure", ["fine_grained", "vanilla"])
def test_other_structures_train_and_validation_loss_drops(cache, tmp_path, structure):
    losses, evals, _ = train(cache, tmp_path, structure, "train_iters=30")
    assert sorted(losses) == list(range(1, 31))
    assert evals[30] < evals[0] - VAL_LOSS_MARGIN, evals


def test_loss_curve_matches_committed_reference(bigmac_run):
    _, losses, _, _ = bigmac_run
    if os.environ.get("UPDATE_LOSS_CURVES"):
        CURVE.parent.mkdir(parents=True, exist_ok=True)
        CURVE.write_text("# step lm_loss: configs/tiny/bigmac.yaml + tests/test_training.py COMMON,"
                         " train_iters=30, 2 CPU processes, EP=2\n"
                         + "".join(f"{s} {losses[s]:.6f}\n" for s in sorted(losses)))
    reference = {int(s): float(v) for s, v in (line.split() for line in CURVE.read_text().splitlines()
                                               if not line.startswith("#"))}
    assert sorted(reference) == sorted(losses)
    for step, value in reference.items():
        assert losses[step] == pytest.approx(value, abs=2e-3), f"step {step}"


# ------------------------------------------------------------------------------ reproducibility
def test_same_seed_gives_identical_losses(cache, tmp_path, bigmac_run):
    _, reference, _, _ = bigmac_run
    losses, _, _ = train(cache, tmp_path, "bigmac", "train_iters=15")
    assert losses == {s: reference[s] for s in range(1, 16)}


def test_expert_parallel_1_and_2_give_the_same_curve(cache, tmp_path, bigmac_run):
    _, reference, _, _ = bigmac_run
    losses, _, _ = train(cache, tmp_path, "bigmac", "train_iters=15", "expert_model_parallel_size=1")
    for step in range(1, 16):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}"


@pytest.mark.parametrize("layout", [
    ("expert_tensor_parallel_size=2",),  # experts split over expert TP (the paper configs' way)
    ("expert_tensor_parallel_size=1", "use_distributed_optimizer=true"),  # experts replicated
])
def test_tensor_parallel_2_clips_with_the_one_rank_grad_norm(cache, tmp_path, layout):
    """The norm that clipping uses counts every expert shard once under TP = 2, as on one rank.
    Same model (CPU initialization, equal vocabulary padding), no dropout, 2 iterations; the
    logged norms agree to fp32 reduction order (~5e-5), a missed shard moves them ~1%."""
    same = ("train_iters=2", "expert_model_parallel_size=1", "hidden_dropout=0", "attention_dropout=0",
            "add_bias_linear=false")  # megatron-core allows expert biases only with expert TP 1
    one_rank, _, _ = train_records(cache, tmp_path / "tp1", *same, "make_vocab_size_divisible_by=256",
                                   nproc=1)
    two_ranks, _, _ = train_records(cache, tmp_path / "tp2", *same, *layout,
                                    "tensor_model_parallel_size=2", "sequence_parallel=true",
                                    "make_vocab_size_divisible_by=128")
    for step in (1, 2):
        assert two_ranks[step]["grad_norm"] == pytest.approx(one_rank[step]["grad_norm"], rel=5e-4)
        assert two_ranks[step]["lm_loss"] == pytest.approx(one_rank[step]["lm_loss"], rel=1e-5)


def test_resume_repeats_the_uninterrupted_run(cache, tmp_path, bigmac_run):
    out, reference, _, _ = bigmac_run
    losses, _, stdout = train(cache, tmp_path, "bigmac", "train_iters=30",
                              f"load={out / 'iter_0000015'}", f"save={tmp_path}")
    assert "resumed from" in stdout
    assert sorted(losses) == list(range(16, 31))
    assert losses == {s: reference[s] for s in range(16, 31)}


def _train_tiny_bigmac_on_gpu(cache, out, *extra):
    """12 steps of tiny BigMac on one GPU in bf16; its metrics.jsonl records."""
    env = dict(os.environ, MEGATRON_BIGMAC_CACHE=str(cache), CUDA_VISIBLE_DEVICES="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "megatron_bigmac.train", "--config", str(TINY / "bigmac.yaml"), *COMMON,
           "expert_model_parallel_size=1", "bf16=true", "train_iters=12", "eval_interval=6",
           f"log_dir={out}", *extra]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_records(got_records, want_records, steps=None):
    """Losses, aux losses and evaluations of two runs within 2e-3 (bf16; the same kernels in
    the same order: a replay that reused a stale batch or RNG state moves the loss far more)."""
    for kind, key in (("train", "lm_loss"), ("train", "aux_loss"), ("eval", "lm_loss")):
        want = {r["step"]: r[key] for r in want_records if r["kind"] == kind
                and (steps is None or r["step"] in steps)}
        got = {r["step"]: r[key] for r in got_records if r["kind"] == kind}
        assert sorted(got) == sorted(want) and len(want) >= 1, (kind, key, sorted(got))
        for step in want:
            assert got[step] == pytest.approx(want[step], abs=2e-3), (kind, key, step)


GRAPHS = ("cuda_graph_impl=local", "cuda_graph_warmup_steps=3")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU (runs on the device)")
def test_cuda_graph_steps_repeat_the_eager_run(cache, tmp_path):
    """cuda_graph_impl=local on one GPU: 3 eager steps, the capture, then replays. With dropout
    on, the losses, aux losses and evaluations equal an eager run's."""
    eager = _train_tiny_bigmac_on_gpu(cache, tmp_path / "eager")
    graph = _train_tiny_bigmac_on_gpu(cache, tmp_path / "graph", *GRAPHS)
    _assert_same_records(graph, eager)
    train_losses = [r["lm_loss"] for r in graph if r["kind"] == "train"]
    assert len(train_losses) == 12
    assert len(set(train_losses)) == len(train_losses)  # every replay saw a new batch


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU (runs on the device)")
def test_cuda_graph_run_saves_and_resumes(cache, tmp_path):
    """A graph run saves at step 6 (after its capture); a graph run resumed from that checkpoint
    (3 eager steps, a capture of its own, replays) repeats steps 7-12 of the uninterrupted one.
    Its checkpoint evaluates on a machine without a GPU (evaluation is eager)."""
    full = tmp_path / "full"
    reference = _train_tiny_bigmac_on_gpu(cache, full, *GRAPHS, f"save={full}", "save_interval=6")
    resumed = _train_tiny_bigmac_on_gpu(cache, tmp_path / "resumed", *GRAPHS,
                                        f"load={full / 'iter_0000006'}")
    _assert_same_records(resumed, reference, steps=range(7, 13))
    assert evaluate_on_cpu(cache, full, max_tokens=2048)["checkpoint"].endswith("iter_0000012")


def test_cuda_graphs_are_rejected_where_a_step_waits_for_the_host():
    from megatron_bigmac.training.config import ConfigError

    one_gpu = ("bf16=true", "expert_model_parallel_size=1")
    cases = [
        (("expert_model_parallel_size=1",), 1, False, r"^cuda_graph_impl: 'local' needs a GPU$"),
        (("bf16=true",), 2, True, r"^cuda_graph_impl: 'local' needs expert_model_parallel_size 1"),
        ((*one_gpu, "moe_expert_capacity_factor=1.2"), 1, True,
         r"^cuda_graph_impl: 'local' needs dropless routing"),
        ((*one_gpu, "moe_token_dispatcher_type=allgather"), 1, True,
         r"^cuda_graph_impl: 'local' needs moe_token_dispatcher_type: alltoall$"),
        ((*one_gpu, "cuda_graph_warmup_steps=0"), 1, True,
         r"^cuda_graph_warmup_steps: must be >= 1, got 0$"),
        ((*one_gpu, "cuda_graph_scope=attn"), 1, True,
         r"^cuda_graph_scope: 'attn' is not one of full_iteration$"),
    ]
    for overrides, world_size, cuda, message in cases:
        with pytest.raises(ConfigError, match=message):
            load(TINY / "bigmac.yaml", "cuda_graph_impl=local", *overrides, world_size=world_size,
                 cuda=cuda)
    cfg = load(TINY / "bigmac.yaml", "cuda_graph_impl=local", *one_gpu, world_size=1, cuda=True)
    assert cfg.cuda_graph_impl == "local" and cfg.cuda_graph_warmup_steps == 3


def test_resume_with_the_distributed_optimizer_repeats_the_uninterrupted_run(cache, tmp_path):
    """DP=2 (EP=1), optimizer state sharded over DP: megatron-core 0.16 without TE/apex restores
    Adam's step wrongly unless compat fixes it (the resumed run then drifts from its 2nd step).
    Resumed with use_distributed_optimizer unset (its default is off on CPU), the run takes the
    checkpoint's; set to false, it is refused in one line before any process starts training."""
    dp2 = ("expert_model_parallel_size=1", "train_iters=12")
    full, save = tmp_path / "full", tmp_path / "resumed"
    reference, _, _ = train(cache, full, "bigmac", *dp2, "use_distributed_optimizer=true",
                            f"save={full}", "save_interval=6")
    losses, _, stdout = train(cache, save, "bigmac", *dp2, f"load={full / 'iter_0000006'}",
                              f"save={save}")
    assert f"[checkpoint] use_distributed_optimizer: True, as {full / 'iter_0000006'} was saved" \
        in stdout
    assert "resumed from" in stdout
    assert losses == {s: reference[s] for s in range(7, 13)}

    with pytest.raises(AssertionError, match=r"config error: use_distributed_optimizer: True -> "
                                             r"False: cannot resume from .*iter_0000006, whose "
                                             r"optimizer state is in the other optimizer's format"):
        train(cache, tmp_path / "refused", "bigmac", *dp2, f"load={full / 'iter_0000006'}",
              "use_distributed_optimizer=false")


def _build_from_two_prefixes(rank, world, cache):
    from megatron_bigmac.training.data import build_datasets, prepare_samples

    os.environ["MEGATRON_BIGMAC_CACHE"] = str(cache)
    twice = "train_data_path=[sample:enwiki-2015-sample-train, sample:enwiki-2015-sample-train]"
    cfg = load(TINY / "bigmac.yaml", twice, "train_iters=3000", "expert_model_parallel_size=1",
               world_size=1)
    prepare_samples(cfg)
    train, valid, train_samples = build_datasets(cfg)
    assert len(train) >= 3000 * cfg.global_batch_size, len(train)
    assert train_samples == 3000 * cfg.global_batch_size
    assert len(valid) >= cfg.eval_iters * cfg.global_batch_size


def test_several_prefixes_give_every_sample_a_long_run_reads(cache):
    """megatron-core concatenates unweighted prefixes for one epoch only; a run reading more
    (here the same sample twice, 3000 x 16 samples) must still get all of them."""
    from distributed import run_distributed

    run_distributed(_build_from_two_prefixes, 1, cache)


def _resumed_sample_order(rank, world, cache):
    from megatron_bigmac.training.data import build_datasets, prepare_samples

    os.environ["MEGATRON_BIGMAC_CACHE"] = str(cache)
    config = lambda iters: load(TINY / "bigmac.yaml", f"train_iters={iters}",
                                "expert_model_parallel_size=1", world_size=1)
    prepare_samples(config(800))
    tokens = lambda dataset, n: [dataset[i]["tokens"].tolist() for i in range(n)]

    saved, _, saved_samples = build_datasets(config(800))  # 12,800 samples: two epochs
    assert saved_samples == 12800 and len(saved) > 12800
    # Resumed with another train_iters (shorter here): the saved order, not the one megatron-core
    # would derive for 770 x 16 samples (one epoch).
    resumed, _, resumed_samples = build_datasets(config(770), resumed_train_samples=saved_samples)
    assert resumed_samples == saved_samples and tokens(resumed, 64) == tokens(saved, 64)
    fresh, _, _ = build_datasets(config(770))
    assert tokens(fresh, 64) != tokens(saved, 64)  # what resuming without the pin would read
    # Longer than the saved order holds: built for the new size (and warned, see the runner).
    longer, _, longer_samples = build_datasets(config(2 * len(saved) // 16),
                                               resumed_train_samples=saved_samples)
    assert longer_samples == 2 * len(saved) // 16 * 16 and len(longer) >= longer_samples


def test_a_resumed_run_keeps_the_saved_runs_sample_order_when_train_iters_changes(cache):
    """megatron-core derives the sample order from the train split's size (train_iters x global
    batch): a checkpoint keeps its run's size, and a resumed run builds that order again."""
    from distributed import run_distributed

    run_distributed(_resumed_sample_order, 1, cache)


def _record_aux_losses(rank, world_size, cache, out, results):
    """A tiny run in-process (2 micro-batches per step, 2 steps per log), recording every
    load-balancing loss megatron-core's router hands its tracker."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MEGATRON_BIGMAC_CACHE=str(cache))
    from megatron_bigmac import compat

    compat.apply()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import router

    from megatron_bigmac.training.trainer import Trainer

    calls = []
    track = router.save_to_aux_losses_tracker

    def recording(name, loss, layer_number, num_layers, *args, **kwargs):
        calls.append((name, loss.item(), layer_number))
        track(name, loss, layer_number, num_layers, *args, **kwargs)

    router.save_to_aux_losses_tracker = recording
    cfg = load(TINY / "bigmac.yaml", "global_batch_size=32", "train_iters=4", "log_interval=2",
               "lr_warmup_iters=1", "eval_iters=0", f"log_dir={out}", world_size=world_size)
    assert cfg.num_microbatches == 2 and cfg.data_parallel_size == 2
    Trainer(cfg).train()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, calls)
    parallel_state.destroy_model_parallel()
    if rank == 0:
        results["calls"] = gathered


def test_logged_aux_loss_is_megatron_cores_tracked_mean(cache, tmp_path):
    """What Megatron-LM's training_log reports through track_moe_metrics: per iteration, each
    layer's loss summed over micro-batches and averaged over data-parallel ranks, summed over
    layers / num_layers / num_microbatches; then averaged over the iterations since the last log.
    With TP=1 that is the plain mean of every recorded loss of the interval, over both ranks."""
    import torch.multiprocessing as mp
    from distributed import run_distributed

    with mp.Manager() as manager:
        results = manager.dict()
        run_distributed(_record_aux_losses, 2, cache, tmp_path, results)
        calls = results["calls"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["aux_loss"] for r in records if r["kind"] == "train"}
    per_interval = 2 * 2 * 2  # iterations x micro-batches x layers, per rank
    for rank_calls in calls:
        assert len(rank_calls) == 2 * per_interval
        assert {name for name, _, _ in rank_calls} == {"load_balancing_loss"}
        assert sorted({layer for _, _, layer in rank_calls}) == [1, 2]
    for interval, step in enumerate((2, 4)):
        losses = [loss for rank_calls in calls
                  for _, loss, _ in rank_calls[interval * per_interval:(interval + 1) * per_interval]]
        assert logged[step] == pytest.approx(sum(losses) / len(losses), rel=1e-6), step


def evaluate_on_cpu(cache, load: Path, max_tokens: int) -> dict:
    """`python -m megatron_bigmac.evaluate --json` of checkpoint ``load`` on WikiText-2 test,
    without a GPU; its result line."""
    env = dict(os.environ, MEGATRON_BIGMAC_CACHE=str(cache), CUDA_VISIBLE_DEVICES="")
    wikitext = ROOT / "megatron_bigmac" / "assets" / "sample" / "wikitext-2-raw-v1-test.articles.jsonl.gz"
    r = subprocess.run([sys.executable, "-m", "megatron_bigmac.evaluate", "--load", str(load),
                        "--data", str(wikitext), "--max-tokens", str(max_tokens), "--json"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_evaluate_cli_gives_perplexity_on_wikitext(cache, bigmac_run):
    out, _, evals, _ = bigmac_run
    result = evaluate_on_cpu(cache, out, max_tokens=8192)
    assert result["tokens"] == 8191 and result["checkpoint"].endswith("iter_0000030")
    # Trained for 30 iterations: far below the untrained model's perplexity.
    assert result["perplexity"] < math.exp(evals[0] - VAL_LOSS_MARGIN)


# ------------------------------------------------------------------------------ configs
def load(path=None, *overrides, world_size=2, cuda=False):
    from megatron_bigmac.training.config import load_config

    return load_config(path, list(overrides), world_size=world_size, cuda=cuda)


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["lr_warmup_iter=3"], 2, r"^lr_warmup_iter: unknown key \(did you mean lr_warmup_iters\?\)$"),
        (["num_expert=8"], 2, r"^num_expert: unknown key \(did you mean num_experts\?\)$"),
        (["lr=fast"], 2, r"^lr: expected a number, got 'fast' \(str\)$"),
        (["train_iters=1.5"], 2, r"^train_iters: expected an integer, got 1.5 \(float\)$"),
        (["bf16=yes please"], 2, r"^bf16: expected true or false"),
        (["train_data_path=3"], 2, r"^train_data_path: expected a list of strings"),
        (["global_batch_size=24"], 2, r"^global_batch_size: 24 is not divisible by micro_batch_size x data-parallel size = 8 x 2$"),
        (["tensor_model_parallel_size=2", "num_attention_heads=3", "hidden_size=96"], 2,
         r"^tensor_model_parallel_size: 2 does not divide num_attention_heads=3$"),
        (["num_attention_heads=5"], 2, r"^num_attention_heads: 5 does not divide hidden_size=64$"),
        (["num_experts=6", "expert_model_parallel_size=4"], 4, r"^expert_model_parallel_size: 4 does not divide num_experts=6$"),
        (["tensor_model_parallel_size=3"], 2, r"^tensor_model_parallel_size: TP=3 x PP=1 does not divide the 2 processes$"),
        (["expert_model_parallel_size=4"], 2, r"^expert_model_parallel_size: EP=4 x expert TP=1 x PP=1 does not divide"),
        (["tensor_model_parallel_size=2"], 4, r"^sequence_parallel: megatron-core MoE with TP > 1 and EP > 1 needs"),
        (["sequence_parallel=true"], 2, r"^sequence_parallel: needs tensor_model_parallel_size > 1$"),
        (["pipeline_model_parallel_size=2"], 4, r"^pipeline_model_parallel_size: pipeline parallelism is not supported"),
        (["moe_structure=dense"], 2, r"^moe_structure: 'dense' is not one of bigmac, fine_grained, vanilla$"),
        (["moe_low_rank_ratio=0.3"], 2, r"^moe_low_rank_ratio: r \* hidden_size = 0.3 \* 64 = 19.2"),
        (["moe_router_topk=9"], 2, r"^moe_router_topk: must be in \[1, num_moe_experts=8\], got 9$"),
        (["bf16=true"], 2, r"^bf16: needs a GPU"),
        (["min_lr=0.1"], 2, r"^min_lr: 0.1 is larger than lr=0.003$"),
        (["lr_warmup_iters=300"], 2, r"^lr_warmup_iters: 300 must be smaller than lr_decay_iters=200$"),
        (["save_interval=10"], 2, r"^save_interval: needs save: <directory>$"),
        (["exit_interval=0"], 2, r"^exit_interval: must be >= 1, got 0$"),
        (["exit_duration_in_mins=0"], 2, r"^exit_duration_in_mins: must be > 0, got 0"),
        (["hidden_dropout=1.5"], 2, r"^hidden_dropout: must be in \[0, 1\)"),
        (["train_data_path=[]", "valid_data_path=[]"], 2, r"^data_path: no training data"),
        (["data_path=[x]"], 2, r"^data_path: set either data_path"),
        (["lr_decay_style=exponential"], 2, r"^lr_decay_style: 'exponential' is not one of"),
        (["seq_length"], 2, r"^seq_length: an override must look like key=value$"),
        (["seed=-1"], 2, r"^seed: must be in \[0, 2\*\*32\), got -1$"),
        (["lr=.nan"], 2, r"^lr: expected a finite number, got nan$"),
        (["clip_grad=.inf"], 2, r"^clip_grad: expected a finite number, got inf$"),
        (["moe_expert_capacity_factor=0"], 2, r"^moe_expert_capacity_factor: must be > 0"),
        (["expert_tensor_parallel_size=0"], 2, r"^expert_tensor_parallel_size: must be >= 1"),
        (["moe_router_topk=1"], 2, r"^moe_router_pre_softmax: Please use --moe-router-pre-softmax"),
        (["tensor_model_parallel_size=2", "sequence_parallel=true", "expert_model_parallel_size=1"],
         2, r"^add_bias_linear: Bias in Moe is only supported when ETP==1$"),
    ],
)
def test_rejected_configs_name_the_key_in_one_line(overrides, world_size, message):
    import torch.distributed as dist

    from megatron_bigmac.training.config import ConfigError

    with pytest.raises(ConfigError, match=message) as info:
        load(TINY / "bigmac.yaml", *overrides, world_size=world_size)
    assert "\n" not in str(info.value)
    assert not dist.is_initialized()  # checked before any process group exists


def test_extends_chain_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(f"extends: {TINY / 'bigmac.yaml'}\nlr: 1.0e-3\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nnum_layers: 3\nmin_lr: 3e-5\n")
    cfg = load(child, "num_layers=4", "save=null")
    assert (cfg.lr, cfg.num_layers, cfg.min_lr, cfg.moe_structure) == (1e-3, 4, 3e-5, "bigmac")
    assert cfg.save is None and cfg.num_microbatches == 1 and cfg.lr_decay_iters == 200
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    from megatron_bigmac.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"^extends: cycle"):
        load(tmp_path / "a.yaml")


def test_cli_stops_on_a_bad_key_before_starting_processes():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "megatron_bigmac.train", "--config",
                        str(TINY / "bigmac.yaml"), "lr_warmup_iter=3"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "config error: lr_warmup_iter: unknown key (did you mean lr_warmup_iters?)")


def test_cli_stops_on_missing_data_before_writing_anything(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "megatron_bigmac.train", "--config",
                        str(TINY / "bigmac.yaml"), "expert_model_parallel_size=1",
                        f"train_data_path=[{tmp_path}/nope]",
                        f"log_dir={tmp_path}/run"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"config error: train_data_path: {tmp_path}/nope.bin does not exist")
    assert not (tmp_path / "run").exists()  # no config.yaml of a run that never started


def test_shipped_configs_parse():
    for structure in STRUCTURES:
        cfg = load(TINY / f"{structure}.yaml")
        assert (cfg.moe_structure, cfg.expert_model_parallel_size) == (structure, 2)
        # No save: metrics go to runs/tiny/<structure>, apart from another size's of the structure.
        assert cfg.save is None and cfg.log_dir == os.path.join("runs", "tiny", structure)
        small = load(ROOT / "configs" / "small" / f"{structure}.yaml", world_size=1, cuda=True)
        assert (small.num_layers, small.hidden_size, small.bf16) == (12, 768, True)
        assert small.cuda_graph_impl == "local"  # one-GPU runs replay CUDA graphs
    # The BigMac variants of docs/reports/small-enwiki-1200-latent.
    r05 = load(ROOT / "configs" / "small" / "bigmac_r05.yaml", world_size=1, cuda=True)
    assert (r05.moe_structure, r05.moe_low_rank_ratio, r05.moe_ffn_hidden_size) == ("bigmac", 0.5, 384)
    relu = load(ROOT / "configs" / "small" / "bigmac_relu.yaml", world_size=1, cuda=True)
    assert (relu.moe_structure, relu.moe_expert_activation) == ("bigmac", "relu")


def _paper_counts(rank, world_size, paths, results):
    import torch
    from megatron.core import parallel_state

    from megatron_bigmac.costs import MoEModelShape, count_parameters
    from megatron_bigmac.training.model import build_gpt, padded_vocab_size

    parallel_state.initialize_model_parallel()
    for path in paths:
        # The layout does not change the model: count it whole, in one process, on meta (with
        # the vocabulary TP 4 pads to).
        cfg = load(path, "tensor_model_parallel_size=1", "expert_model_parallel_size=1",
                   "sequence_parallel=false", "make_vocab_size_divisible_by=128", world_size=1,
                   cuda=True)
        with torch.device("meta"):
            model = build_gpt(cfg, meta=True)
        built = sum(p.numel() for p in model.parameters())
        shape = MoEModelShape.from_config(model.config, cfg.seq_length, padded_vocab_size(cfg))
        results[path.stem] = (built, count_parameters(shape)["total"])
    parallel_state.destroy_model_parallel()


def test_paper_configs_match_table_5_and_build_on_meta_with_analytic_counts():
    import torch.multiprocessing as mp
    from distributed import run_distributed

    from megatron_bigmac.training.model import padded_vocab_size

    paths = sorted(p for p in PAPER.glob("gpt3_*.yaml") if not p.stem.endswith("_base"))
    assert len(paths) == 6
    for path in paths:
        cfg = load(path, world_size=32, cuda=True)  # TP=4 x EP=4 on 32 GPUs
        table5 = dict(num_layers=24, num_attention_heads=16, seq_length=2048, global_batch_size=256,
                      hidden_dropout=0.1, attention_dropout=0.1, moe_expert_capacity_factor=1.2,
                      moe_aux_loss_coeff=1e-3, adam_eps=1e-8, adam_beta1=0.9, adam_beta2=0.95,
                      weight_decay=0.1, lr=3e-4, min_lr=3e-5, lr_decay_style="cosine", clip_grad=1.0,
                      seed=1234, tensor_model_parallel_size=4, expert_model_parallel_size=4, bf16=True)
        assert {k: getattr(cfg, k) for k in table5} == table5, path.name
        xl = "_xl_" in path.name
        assert cfg.hidden_size == (2048 if xl else 1024)
        assert (cfg.lr_decay_iters, cfg.lr_warmup_iters) == ((5200, 1200) if xl else (28000, 5000))
        assert cfg.data_parallel_size == 8 and 32 // (4 * 4) == 2  # dense DP 8, expert DP 2
        assert padded_vocab_size(cfg) == 50304, path.name  # Table 4's vocabulary, at TP 4

    with mp.Manager() as manager:
        results = manager.dict()
        run_distributed(_paper_counts, 1, paths, results)
        results = dict(results)
    for name, (built, analytic) in results.items():
        assert built == analytic, name
    assert round(results["gpt3_xl_fine_grained"][0] / 1e9, 2) == 3.73  # Table 3
    assert round(results["gpt3_xl_bigmac"][0] / 1e9, 2) == 3.78

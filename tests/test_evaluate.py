"""`python -m megatron_bigmac.evaluate` on a tiny checkpoint (2 iterations of tiny BigMac on mock
data, one process): the same perplexity at TP=1 and at TP=2 (2 gloo processes); eod_mask_loss
scores what training scores; bad arguments
and unreadable data refused in one line (exit 2) before a model is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Three documents: the JSON-lines reader ends each with <|endoftext|>.
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog near the river bank, while three small birds "
    "watch from an old oak tree and the farmer walks slowly home across the wide green field.",
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring "
    "role on the television series The Bill in 2000, followed by a role in a play.",
    "In 2006 he starred alongside Whishaw in the play Citizenship written by Mark Ravenhill, and "
    "appeared on a 2006 episode of the television series Doctors, followed by a film role.",
]
TP2 = ("tensor_model_parallel_size=2", "sequence_parallel=true", "expert_tensor_parallel_size=1")


def env(cache: Path) -> dict:
    return dict(os.environ, MEGATRON_BIGMAC_CACHE=str(cache), CUDA_VISIBLE_DEVICES="",
                OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def checkpoint(cache, tmp_path_factory) -> Path:
    """A save directory of tiny BigMac after 2 iterations (TP=1, EP=1; vocabulary 50,304)."""
    out = tmp_path_factory.mktemp("ckpt")
    cmd = [sys.executable, "-m", "megatron_bigmac.train", "--config",
           str(ROOT / "configs" / "tiny" / "bigmac.yaml"), "expert_model_parallel_size=1",
           "train_iters=2", "lr_warmup_iters=1", "mock_data=true", "train_data_path=[]",
           "valid_data_path=[]", "eval_iters=0", f"save={out}", f"log_dir={out}"]
    r = subprocess.run(cmd, env=env(cache), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS))
    return path


def evaluate(cache: Path, load: Path, data: Path, *overrides: str, nproc: int = 1) -> dict:
    """The --json result line of the evaluate CLI (under torchrun when ``nproc`` > 1)."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable])
    r = subprocess.run([*launch, "-m", "megatron_bigmac.evaluate", "--load", str(load), "--data",
                        str(data), "--seq-length", "32", "--json", *overrides],
                       env=env(cache), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tp1(cache, checkpoint, documents) -> dict:
    return evaluate(cache, checkpoint, documents)


def test_tensor_parallel_2_gives_the_one_process_perplexity(cache, checkpoint, documents, tp1):
    """The model keeps the checkpoint's padded vocabulary in any layout: padded again for TP=2,
    its extra (never loaded) output rows would enter the softmax."""
    tp2 = evaluate(cache, checkpoint, documents, *TP2, nproc=2)
    assert tp2["tokens"] == tp1["tokens"] > 100
    assert tp2["loss"] == pytest.approx(tp1["loss"], abs=1e-6)


def test_eod_mask_loss_leaves_the_tokens_after_each_document_end_unscored(
        cache, checkpoint, documents, tp1):
    """As megatron-core's GPTDataset in training: positions whose input is <|endoftext|> (the
    first token of the next document) are not scored. Three documents: two such positions."""
    masked = evaluate(cache, checkpoint, documents, "eod_mask_loss=true")
    assert tp1["eod_mask_loss"] is False and masked["eod_mask_loss"] is True
    assert masked["tokens"] == tp1["tokens"] - (len(DOCUMENTS) - 1)
    assert masked["loss"] != tp1["loss"]


def test_data_with_nothing_to_score_under_eod_mask_loss_is_refused(checkpoint, no_model, tmp_path,
                                                                   capsys):
    data = tmp_path / "ends.jsonl"
    data.write_text('{"text": ""}\n' * 3)  # <|endoftext|> x 3: every target follows one
    err = refuse(capsys, "--load", str(checkpoint), "--data", str(data), "eod_mask_loss=true")
    assert err.startswith(f"error: --data: {data}: no token to score"), err


# ------------------------------------------------------------------------------ refusals
def refuse(capsys, *argv: str) -> str:
    """Run the CLI in this process on arguments it must refuse before it builds a model: exit 2,
    one line on stderr (returned)."""
    from megatron_bigmac import evaluate as cli

    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.fixture
def no_model(monkeypatch, cache):
    """Building the model fails the test: the refusals come before it."""
    from megatron_bigmac.training import distributed, model

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(distributed, "init_distributed", built)
    monkeypatch.setattr(model, "build_gpt", built)
    monkeypatch.setenv("MEGATRON_BIGMAC_CACHE", str(cache))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_tensor_parallel_size_that_does_not_divide_the_saved_vocabulary_is_refused(
        checkpoint, documents, no_model, monkeypatch, capsys):
    from megatron.core import dist_checkpointing

    load_common = dist_checkpointing.load_common_state_dict

    def unpadded(path):  # a checkpoint trained with make_vocab_size_divisible_by=1: 50,257 rows
        common = load_common(path)
        common["config"]["make_vocab_size_divisible_by"] = 1
        return common

    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", unpadded)
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = refuse(capsys, "--load", str(checkpoint), "--data", str(documents), *TP2)
    assert err == ("config error: tensor_model_parallel_size: 2 does not divide the checkpoint's "
                   "padded vocabulary (50257)\n")


def test_a_checkpoint_tokenizer_dir_missing_here_is_refused_in_one_line(
        checkpoint, documents, no_model, monkeypatch, capsys, tmp_path):
    from megatron.core import dist_checkpointing

    load_common = dist_checkpointing.load_common_state_dict
    elsewhere = str(tmp_path / "cluster" / "tokenizer")  # trained with a path not on this machine

    def trained_elsewhere(path):
        common = load_common(path)
        common["config"]["tokenizer_dir"] = elsewhere
        return common

    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", trained_elsewhere)
    err = refuse(capsys, "--load", str(checkpoint), "--data", str(documents))
    assert err == (f"config error: tokenizer_dir: tokenizer directory {elsewhere!r} does not "
                   "exist (the checkpoint's; give tokenizer_dir=DIR)\n")
    # ... and tokenizer_dir=DIR on the command line replaces it.
    shipped = ROOT / "megatron_bigmac" / "assets" / "gpt2"
    err = refuse(capsys, "--load", str(checkpoint), "--data", str(tmp_path / "none.txt"),
                 f"tokenizer_dir={shipped}")
    assert err.startswith("error: --data:"), err


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "is neither a dataset prefix nor a file"),
    ("empty.txt", "", "0 tokens; at least 2 are needed"),
    ("empty.jsonl", "", "0 tokens; at least 2 are needed"),
    ("one.txt", "Hello", "1 tokens; at least 2 are needed"),
    ("lone.bin", "not an indexed dataset", "no indexed dataset"),
    ("bad.jsonl", '{"text": "fine"}\nnot json\n', 'line 2: not a JSON object with a "text" string'),
    ("notext.jsonl", '{"body": "x"}\n', 'line 1: not a JSON object with a "text" string'),
])
def test_bad_data_is_refused_in_one_line_before_the_model(checkpoint, no_model, tmp_path, capsys,
                                                          name, content, message):
    data = tmp_path / name
    if content is not None:
        data.write_text(content)
    err = refuse(capsys, "--load", str(checkpoint), "--data", str(data))
    assert err.startswith(f"error: --data: {data}") and message in err, err


def test_indexed_dataset_is_read_by_its_prefix_or_either_file(tmp_path):
    """PREFIX.bin and PREFIX.idx name the dataset too (the .bin was read as UTF-8 text)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_bigmac.evaluate import read_tokens
    from megatron_bigmac.training.config import TrainingConfig

    prefix = str(tmp_path / "docs_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for document in ([10, 11, 12, 50256], [13, 14, 50256]):
        builder.add_item(torch.tensor(document))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    for data in (prefix, prefix + ".bin", prefix + ".idx"):
        tokens = read_tokens(data, TrainingConfig(), None)
        assert tokens.tolist() == [10, 11, 12, 50256, 13, 14, 50256]


@pytest.mark.parametrize("option, value, message", [
    ("--stride", "0", "error: 0 < --seq-length <= 64 and 0 < --stride <= --seq-length"),
    ("--stride", "65", "error: 0 < --seq-length <= 64 and 0 < --stride <= --seq-length"),
    ("--seq-length", "0", "error: 0 < --seq-length <= 64 and 0 < --stride <= --seq-length"),
    ("--seq-length", "65", "error: 0 < --seq-length <= 64 and 0 < --stride <= --seq-length"),
    ("--max-tokens", "0", "error: --max-tokens: at least 2"),
    ("--micro-batch-size", "0", "config error: micro_batch_size"),
])
def test_zero_and_out_of_range_options_are_refused(checkpoint, documents, no_model, capsys,
                                                   option, value, message):
    """0 is refused, not taken for "the default" (--stride 0 ran with stride 64)."""
    err = refuse(capsys, "--load", str(checkpoint), "--data", str(documents), option, value)
    assert err.startswith(message), err

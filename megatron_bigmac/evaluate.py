"""Perplexity of a trained checkpoint on any text.

    python -m megatron_bigmac.evaluate --load checkpoints/small/bigmac \\
        --data ../shared/data/wikitext/wikitext-2-raw-v1-test.nonempty.raw
    torchrun --nproc_per_node 2 -m megatron_bigmac.evaluate --load CKPT --data PREFIX \\
        expert_model_parallel_size=2

``--data`` is a megatron-core dataset prefix (``PREFIX`` of ``PREFIX.bin``/``PREFIX.idx``, or
either file's path; ``sample:NAME`` for a shipped sample), a plain text file (read as one stream:
``.txt``, ``.raw``, ...) or JSON lines (``.jsonl``/``.jsonl.gz``, one document per line in
``text``, documents separated by <|endoftext|> as in training). The tokens are cut into windows of
``--seq-length`` (default: the checkpoint's); with ``--stride`` below it, windows overlap and only
their last ``stride`` tokens are scored, so each token is scored once with more context.
Perplexity is exp of the mean negative log-likelihood over all scored tokens. A checkpoint trained
with ``eod_mask_loss`` is evaluated like its training: the token after each <|endoftext|> is not
scored.

The model is rebuilt from the config saved in the checkpoint, in any layout (``key=value``
overrides such as ``expert_model_parallel_size=2``; default one process per data-parallel rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np


def read_tokens(data: str, cfg, tokenizer) -> np.ndarray:
    """All tokens of ``data`` (see module docstring) as one int64 array. Raises OSError or
    ValueError for data that cannot be read."""
    from megatron_bigmac.training.data import prepare_samples, resolve_prefix

    if data.startswith("sample:") and not Path(data[len("sample:"):]).exists():
        # A shipped sample: tokenized into the cache like training data.
        cfg.valid_data_path = [data]
        prepare_samples(cfg)
    prefix = resolve_prefix(data, cfg)
    if prefix.endswith((".bin", ".idx")):  # one of the indexed dataset's files names its prefix
        prefix = prefix[: -len(".bin")]
    if os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
        return np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64)
    if data.endswith((".bin", ".idx")):  # binary: never read as text
        raise FileNotFoundError(f"{data}: no indexed dataset {prefix}.bin + {prefix}.idx")
    if not os.path.isfile(data):
        raise FileNotFoundError(f"{data} is neither a dataset prefix nor a file")
    opener = gzip.open if data.endswith(".gz") else open
    with opener(data, "rt", encoding="utf-8") as f:
        if ".jsonl" in data or data.endswith((".json", ".json.gz")):
            ids: List[int] = []
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):  # not JSON, no "text", not an object
                    text = None
                if not isinstance(text, str):
                    raise ValueError(f'{data} line {number}: not a JSON object with a "text" '
                                     "string")
                ids += tokenizer.tokenize(text) + [tokenizer.eod]
            return np.asarray(ids, dtype=np.int64)
        return np.asarray(tokenizer.tokenize(f.read()), dtype=np.int64)


def windows(tokens: np.ndarray, seq_length: int, stride: int, eod: Optional[int] = None):
    """(inputs, labels, loss_mask) rows covering every token but the first exactly once. With
    ``eod``, positions whose input is ``eod`` are not scored (training's eod_mask_loss, as
    megatron-core's GPTDataset masks them: the first token of each next document)."""
    rows = []
    n = len(tokens) - 1  # positions that have a next token to predict
    start = 0
    while True:
        end = min(start + seq_length, n)
        inputs = np.zeros(seq_length, np.int64)
        labels = np.zeros(seq_length, np.int64)
        mask = np.zeros(seq_length, np.float32)
        inputs[: end - start] = tokens[start:end]
        labels[: end - start] = tokens[start + 1 : end + 1]
        first_scored = 0 if start == 0 else seq_length - stride
        mask[first_scored : end - start] = 1.0
        if eod is not None:
            mask[inputs == eod] = 0.0
        rows.append((inputs, labels, mask))
        if end >= n:
            return rows
        start += stride


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_bigmac.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="checkpoint: a save directory or an iter_NNNNNNN directory")
    parser.add_argument("--data", required=True,
                        help="dataset prefix, sample:NAME, a text file or a JSON-lines file")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="window length (default: the trained seq_length)")
    parser.add_argument("--stride", type=int, default=None,
                        help="default: --seq-length (no overlap)")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from megatron_bigmac import compat

    compat.apply()  # megatron-core shims, before any of its code runs
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_bigmac.data import build_tokenizer
    from megatron_bigmac.data.tokenizer import TokenizerFilesError
    from megatron_bigmac.training.checkpoint import find_checkpoint, load_model_weights
    from megatron_bigmac.training.config import ConfigError, from_dict, parse_overrides, validate
    from megatron_bigmac.training.distributed import (
        destroy_distributed, init_distributed, set_seed,
    )
    from megatron_bigmac.training.metrics import perplexity, quiet_known_warnings, strict_json
    from megatron_bigmac.training.model import Float16Module, build_gpt, padded_vocab_size

    quiet_known_warnings()

    main_rank = os.environ.get("RANK", "0") == "0"
    where = find_checkpoint(args.load)
    if where is None:
        print(f"error: --load: no checkpoint in {args.load}", file=sys.stderr)
        return 2
    saved = dist_checkpointing.load_common_state_dict(str(where))["config"]
    # The trained model in this run's layout; the training data and schedule do not matter here.
    values = {**saved, "tensor_model_parallel_size": 1, "expert_model_parallel_size": 1,
              "expert_tensor_parallel_size": None, "sequence_parallel": False, "mock_data": True,
              "data_path": [], "train_data_path": [], "valid_data_path": [], "save": None,
              "load": None, "save_interval": None, "use_distributed_optimizer": None,
              "use_cpu_initialization": None, "eval_iters": 0,
              # Evaluation is eager (CUDA graphs replay training steps only), on any device.
              "cuda_graph_impl": "none"}
    cuda = torch.cuda.is_available()
    if not cuda:
        values["bf16"] = False
    try:
        values.update(parse_overrides(args.overrides))
        cfg = from_dict(values)
        if args.micro_batch_size is not None:  # 0 is refused by validate, not ignored
            cfg.micro_batch_size = args.micro_batch_size
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), cuda)
        # The vocabulary was padded for the TRAINING tensor-parallel size: build exactly the
        # saved rows in this layout (padded again for this TP, the extra output rows would never
        # be loaded, yet enter the softmax).
        vocab = padded_vocab_size(dataclasses.replace(
            cfg, make_vocab_size_divisible_by=saved.get("make_vocab_size_divisible_by", 128),
            tensor_model_parallel_size=saved.get("tensor_model_parallel_size", 1)))
        if vocab % cfg.tensor_model_parallel_size:
            raise ConfigError(f"tensor_model_parallel_size: {cfg.tensor_model_parallel_size} "
                              f"does not divide the checkpoint's padded vocabulary ({vocab})")
        cfg.make_vocab_size_divisible_by = vocab // cfg.tensor_model_parallel_size
        tokenizer = build_tokenizer(cfg.tokenizer_dir)
    except ConfigError as e:
        if main_rank:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    except TokenizerFilesError as e:  # the checkpoint's tokenizer_dir is not on this machine
        if main_rank:
            print(f"config error: tokenizer_dir: {e} (the checkpoint's; give tokenizer_dir=DIR)",
                  file=sys.stderr)
        return 2
    # "is None": 0 is a value to refuse, not a request for the default.
    seq_length = args.seq_length if args.seq_length is not None else cfg.seq_length
    stride = args.stride if args.stride is not None else seq_length
    if not 0 < seq_length <= cfg.max_position_embeddings or not 0 < stride <= seq_length:
        print(f"error: 0 < --seq-length <= {cfg.max_position_embeddings} and 0 < --stride <= "
              f"--seq-length", file=sys.stderr)
        return 2
    if args.max_tokens is not None and args.max_tokens < 2:
        print("error: --max-tokens: at least 2 (the first token is never scored)", file=sys.stderr)
        return 2

    # The data before the model: a bad --data is found in seconds, not after a large load.
    try:
        tokens = read_tokens(args.data, cfg, tokenizer)
    except (OSError, ValueError) as e:
        if main_rank:
            print(f"error: --data: {e}", file=sys.stderr)
        return 2
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    if len(tokens) < 2:  # the first token is never scored
        if main_rank:
            print(f"error: --data: {args.data} has {len(tokens)} tokens; at least 2 are needed",
                  file=sys.stderr)
        return 2
    rows = windows(tokens, seq_length, stride, tokenizer.eod if cfg.eod_mask_loss else None)
    if not any(mask.any() for _, _, mask in rows):
        if main_rank:
            print(f"error: --data: {args.data}: no token to score (every one follows "
                  f"<|endoftext|>, and eod_mask_loss is on)", file=sys.stderr)
        return 2

    try:
        ctx = init_distributed(cfg)
        set_seed(cfg.seed)
        model = build_gpt(cfg, ctx.pg_collection, meta=True).to(ctx.device)
        if cfg.bf16:
            model = Float16Module(model.config, model)
        load_model_weights(model, where)
        model.eval()

        # Every rank runs the same number of forward passes (MoE dispatch is collective):
        # rank r takes rows r, r + DP, ...; missing rows are padding with an empty mask.
        mbs = cfg.micro_batch_size
        per_rank = math.ceil(len(rows) / (ctx.dp_size * mbs)) * mbs
        padding = (rows[0][0], rows[0][1], np.zeros(seq_length, np.float32))
        mine = [rows[i] if i < len(rows) else padding
                for i in range(ctx.dp_rank, per_rank * ctx.dp_size, ctx.dp_size)]
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        positions = torch.arange(seq_length, device=ctx.device).unsqueeze(0)
        with torch.no_grad():
            for b in range(0, len(mine), mbs):
                inputs, labels, mask = (torch.from_numpy(np.stack(c)).to(ctx.device)
                                        for c in zip(*mine[b : b + mbs]))
                losses = model(inputs, positions.expand_as(inputs), None, labels=labels)
                sums += torch.stack([(losses.float() * mask).sum(), mask.sum()]).double()
        dist.all_reduce(sums, group=ctx.pg_collection.dp)
        nll, scored = (sums[0] / sums[1]).item(), int(sums[1].item())
    finally:
        destroy_distributed()

    if main_rank:
        result = {"checkpoint": str(where), "data": args.data, "tokens": scored, "loss": nll,
                  "perplexity": perplexity(nll), "seq_length": seq_length, "stride": stride,
                  "eod_mask_loss": cfg.eod_mask_loss}
        if args.json:
            print(strict_json(result))  # a diverged checkpoint's NaN loss as null
        else:
            unscored = np.count_nonzero(tokens[:-1] == tokenizer.eod) if cfg.eod_mask_loss else 0
            skipped = (f" ({unscored:,} after <|endoftext|> not scored: eod_mask_loss)"
                       if unscored else "")
            print(f"{args.data}: perplexity {result['perplexity']:,.2f} (loss {nll:.4f} nats/token "
                  f"over {scored:,} tokens{skipped}; windows of {seq_length}, stride {stride})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

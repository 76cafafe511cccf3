"""Data: megatron-core GPTDatasets (train/valid) via BlendedMegatronDatasetBuilder, read in
Megatron-LM's order so a run resumes from its consumed-samples count alone.

Prefixes name megatron-core indexed datasets (``.bin``/``.idx``, from
``python -m megatron_bigmac.data.preprocess``). ``sample:NAME`` names the small corpus shipped in
``megatron_bigmac/assets/sample/NAME.jsonl.gz``; it is tokenized into the cache on first use, so
the tiny configs run on a fresh machine with nothing prepared.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import Split

from megatron_bigmac.data import build_tokenizer
from megatron_bigmac.data.tokenizer import TokenizerFilesError, tokenizer_vocab_size
from megatron_bigmac.training.config import ConfigError, TrainingConfig

logger = logging.getLogger(__name__)

SAMPLE_SCHEME = "sample:"
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "assets" / "sample"

#: Bytes read from each end of a .bin to check its token ids against the vocabulary. A corpus
#: tokenized with another vocabulary has such ids throughout, so its ends show it; reading all of
#: a multi-GB .bin would add minutes to every start.
ID_CHECK_BYTES = 8 << 20


def cache_dir(cfg: TrainingConfig) -> Path:
    """Tokenized samples and megatron-core's dataset indices live here."""
    if cfg.data_cache_path:
        return Path(cfg.data_cache_path)
    default = Path.home() / ".cache" / "megatron_bigmac"
    return Path(os.environ.get("MEGATRON_BIGMAC_CACHE", default))


def resolve_prefix(prefix: str, cfg: TrainingConfig) -> str:
    """A dataset prefix on disk: ``sample:NAME`` maps into the cache, anything else is a path."""
    if not prefix.startswith(SAMPLE_SCHEME):
        return prefix
    name = prefix[len(SAMPLE_SCHEME):]
    return str(cache_dir(cfg) / "sample" / name) + "_text_document"


def _prefixes(cfg: TrainingConfig) -> Iterator[Tuple[str, str]]:
    """(key, prefix) of every dataset prefix the config reads."""
    for key in ("data_path", "train_data_path", "valid_data_path"):
        for prefix in getattr(cfg, key):
            yield key, prefix


def sample_source(prefix: str, key: str) -> Path:
    """The shipped file of ``sample:NAME``; FileNotFoundError naming the key and the valid
    names when there is none."""
    source = SAMPLE_DIR / f"{prefix[len(SAMPLE_SCHEME):]}.jsonl.gz"
    if not source.is_file():
        shipped = sorted(p.name[: -len(".jsonl.gz")] for p in SAMPLE_DIR.glob("*.jsonl.gz"))
        raise FileNotFoundError(f"{key}: {prefix}: no shipped sample of that name "
                                f"(have {', '.join(shipped)})")
    return source


def prepare_samples(cfg: TrainingConfig) -> None:
    """Tokenize every ``sample:NAME`` the config reads that is not in the cache yet.

    Call on one process per host (then barrier): the data helper writes under temporary names
    and renames, so a crash never leaves a dataset that looks complete.
    """
    from megatron_bigmac.data import preprocess

    for key, prefix in _prefixes(cfg):
        if not prefix.startswith(SAMPLE_SCHEME):
            continue
        target = resolve_prefix(prefix, cfg)
        if os.path.exists(target + ".idx") and os.path.exists(target + ".bin"):
            continue
        source = sample_source(prefix, key)
        os.makedirs(Path(target).parent, exist_ok=True)
        output_prefix = target[: -len("_text_document")]
        argv = ["--dataset", str(source), "--output-prefix", output_prefix, "--workers", "0",
                "--quiet", "--overwrite"]
        if cfg.tokenizer_dir:
            argv += ["--tokenizer", cfg.tokenizer_dir]
        print(f"[data] tokenizing the shipped sample {source.name} -> {target}", flush=True)
        preprocess.preprocess(preprocess.build_parser().parse_args(argv)).print()


def check_prefixes(cfg: TrainingConfig, samples: bool = True) -> None:
    """Fail early, naming the key, when a dataset prefix does not exist, is damaged, holds ids
    beyond the tokenizer's vocabulary, or leaves a split without documents (``samples=False``: of
    a shipped ``sample:`` prefix only its shipped file, as prepare_samples may not have run yet)."""
    try:
        vocab = tokenizer_vocab_size(cfg.tokenizer_dir)
    except TokenizerFilesError as e:
        raise ConfigError(f"tokenizer_dir: {e}") from None
    for key, prefix in _prefixes(cfg):
        if prefix.startswith(SAMPLE_SCHEME):
            source = sample_source(prefix, key)
            if not samples:
                if key == "data_path":
                    _check_split(cfg, prefix, _sample_documents(source))
                continue
        path = resolve_prefix(prefix, cfg)
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(path + suffix):
                raise FileNotFoundError(f"{key}: {path}{suffix} does not exist")
        dtype, lengths = _read_index(key, path)
        _check_token_ids(key, path, dtype, vocab, cfg.tokenizer_dir)
        if key == "data_path":
            _check_split(cfg, prefix, len(lengths))
        elif not len(lengths):  # megatron-core would loop forever (see _check_split)
            raise ConfigError(f"{key}: {path} holds no documents")


def _check_token_ids(key: str, path: str, dtype: type, vocab: int,
                     tokenizer_dir: Optional[str]) -> None:
    """Ids outside the vocabulary would index past the embedding (on a GPU a device-side assert
    that kills the job); read ID_CHECK_BYTES at each end of the .bin."""
    if not os.path.getsize(path + ".bin"):
        return
    tokens = np.memmap(path + ".bin", dtype=dtype, mode="r")
    n = ID_CHECK_BYTES // tokens.itemsize
    for part in (tokens[:n], tokens[-n:]):
        low, high = int(part.min()), int(part.max())
        if low < 0 or high >= vocab:
            raise ConfigError(
                f"{key}: {path}.bin holds token id {low if low < 0 else high:,}, outside the "
                f"{vocab:,}-token vocabulary of {tokenizer_dir or 'the GPT-2 BPE'} (tokenized "
                "with another tokenizer? set tokenizer_dir to its vocab.json/merges.txt)")


def _check_split(cfg: TrainingConfig, prefix: str, documents: int) -> None:
    """megatron-core cuts every data_path prefix by ``split`` (round(bound x documents) for each
    bound of its split_matrix) and builds each split of nonzero weight, even one the run never
    reads; on one without documents GPTDataset._get_num_epochs loops forever."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    counts = [0 if m is None else int(round(m[1] * documents)) - int(round(m[0] * documents))
              for m in matrix]
    empty = [s.name for s, m, n in zip(Split, matrix, counts) if m is not None and n == 0]
    if empty:
        raise ConfigError(
            f"split: {cfg.split!r} leaves the {'/'.join(empty)} split of data_path {prefix} "
            f"empty ({documents:,} documents: {counts[0]:,} train, {counts[1]:,} valid, "
            f"{counts[2]:,} test); give every split a document, or weight 0 to leave one out")


def _sample_documents(source: Path) -> int:
    """Documents that preprocessing keeps of a shipped sample (those with text)."""
    with gzip.open(source, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip() and json.loads(line)["text"])


def _read_index(key: str, path: str) -> Tuple[type, np.ndarray]:
    """Token dtype and document lengths of ``path``.idx, checked against the sizes of the .idx
    and the .bin: a damaged dataset fails here, naming the file, not in megatron-core after the
    process groups exist, nor hours in when a sample reads the missing bytes. The layout is
    megatron-core's (indexed_dataset._IndexReader): 34 bytes of header (magic, version, dtype
    code, sequence and document counts), int32 lengths, int64 pointers, int64 document indices."""
    idx = path + ".idx"
    with open(idx, "rb") as f:
        head = f.read(34)
    try:
        if len(head) < 34 or not head.startswith(_INDEX_HEADER):
            raise ValueError("no header")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[len(_INDEX_HEADER):])
        if version != 1:
            raise ValueError(f"version {version}")
        dtype = DType.dtype_from_code(code)
    except ValueError as e:
        raise ConfigError(f"{key}: {idx} is not a megatron-core index ({e})") from None
    size, needed = os.path.getsize(idx), 34 + 12 * sequences + 8 * documents
    if size != needed:
        raise ConfigError(f"{key}: {idx} is {'truncated' if size < needed else 'damaged'} "
                          f"({size:,} bytes, its header needs {needed:,})")
    lengths = np.fromfile(idx, dtype=np.int32, count=sequences, offset=34)
    size = os.path.getsize(path + ".bin")
    needed = int(lengths.sum(dtype=np.int64)) * np.dtype(dtype).itemsize
    if size != needed:
        raise ConfigError(f"{key}: {path}.bin has {size:,} bytes, its .idx needs {needed:,} "
                          "(truncated, or not the .bin of this .idx)")
    return dtype, lengths


def build_datasets(cfg: TrainingConfig, resumed_train_samples: Optional[int] = None
                   ) -> Tuple[GPTDataset, Optional[GPTDataset], int]:
    """Train and validation GPTDatasets with the samples the run reads: the train split
    ``train_iters x global_batch_size`` samples, the validation split ``eval_iters x
    global_batch_size`` (the same held-out batches at every evaluation). Returns them and the
    train split's requested size, which a checkpoint keeps.

    megatron-core derives the whole sample order from that size. A resumed run passes its
    checkpoint's (``resumed_train_samples``) and keeps that order while the dataset built for
    it holds the samples this run reads (to the end of its last epoch, so also for a somewhat
    longer train_iters); beyond, the train split is built for the new size, and a warning says
    that the order from there on is not the saved run's."""
    needed = cfg.train_iters * cfg.global_batch_size
    train_samples = resumed_train_samples or needed
    train, valid = _build(cfg, train_samples)
    if len(train) < needed and train_samples != needed:
        if os.environ.get("RANK", "0") == "0":
            print(f"[data] WARNING: train_iters={cfg.train_iters} reads {needed} samples, more "
                  f"than the {len(train)} in the checkpoint's sample order ({train_samples} "
                  f"requested): the train data is reshuffled for {needed}, so the rest of the "
                  f"run may see some samples again and skip others", flush=True)
        train_samples = needed
        train, valid = _build(cfg, train_samples)
    for name, dataset, wanted in (("train", train, needed),
                                  ("valid", valid, cfg.eval_iters * cfg.global_batch_size)):
        if wanted and len(dataset) < wanted:
            raise ValueError(f"{name} data: {len(dataset)} samples built, the run reads {wanted}")
    return train, (valid if cfg.eval_iters > 0 else None), train_samples


def _build(cfg: TrainingConfig, train_samples: int) -> Tuple[GPTDataset, GPTDataset]:
    tokenizer = build_tokenizer(cfg.tokenizer_dir)
    blend = blend_per_split = split = None
    if cfg.data_path:
        blend, split = _blend([resolve_prefix(p, cfg) for p in cfg.data_path]), cfg.split
    elif cfg.train_data_path:
        train = [resolve_prefix(p, cfg) for p in cfg.train_data_path]
        valid = [resolve_prefix(p, cfg) for p in cfg.valid_data_path]
        blend_per_split = [_blend(train), _blend(valid) if valid else None, None]
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=str(cache_dir(cfg) / "index"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,  # causal attention builds its own mask
    )
    sizes = [train_samples, cfg.eval_iters * cfg.global_batch_size, 0]
    dataset_class = MockGPTDataset if cfg.mock_data else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_class, sizes, lambda: True, config
    ).build()
    return train, valid


def _blend(prefixes: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """megatron-core's (prefixes, weights). Without weights it concatenates several prefixes for
    ONE epoch only, fewer samples than a long run reads (its StopIteration would come hours in);
    weights by token count keep the concatenation's proportions and let it build more epochs."""
    if len(prefixes) == 1:
        return prefixes, None
    return prefixes, [_token_count(p) for p in prefixes]


def _token_count(prefix: str) -> float:
    dataset = IndexedDataset(prefix)  # keep it (and its mmap) alive while numpy reads the lengths
    return float(dataset.sequence_lengths.sum())


class PretrainingSampler:
    """Megatron-LM's MegatronPretrainingSampler: global samples in order from
    ``consumed_samples``, each global micro-batch of ``micro x DP`` samples split by DP rank."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        return remaining // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        mbs = self.micro_batch_size
        mine = slice(self.dp_rank * mbs, (self.dp_rank + 1) * mbs)
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start, start + step))[mine]


def batches(dataset, cfg: TrainingConfig, dp_rank: int, dp_size: int,
            consumed_samples: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """Micro-batches of this DP rank (dicts of [micro, seq] tensors) from ``consumed_samples``."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, cfg.micro_batch_size, dp_rank,
                                 dp_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
        # Its own generator: creating an iterator draws a seed, which must not move the global
        # RNG that dropout uses (or a resumed run would not repeat the uninterrupted one).
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return iter(loader)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

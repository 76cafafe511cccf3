"""Turn a text corpus into megatron-core indexed datasets (``.bin``/``.idx``) of GPT-2 tokens.

    python -m megatron_bigmac.data.preprocess --dataset <hub name or local JSONL/Parquet globs> \\
        --tokenizer <dir with vocab.json + merges.txt> --output-prefix <path> \\
        [--split-validation N] [--workers K]

Pipeline:

1. load (the only per-source step, ``iter_tasks``): a hub dataset (e.g. ``wikimedia/wikipedia``
   config ``20231101.en``) is streamed by Hugging Face ``datasets.load_dataset``; local Parquet
   is read with pyarrow; local JSONL(.gz) is decompressed and cut at line ends here and parsed
   in the workers. Either way the result is a stream of *tasks*, each about ``--task-chars`` of
   documents, in corpus order;
2. tokenize: worker processes turn each task into GPT-2 ids with ``<|endoftext|>`` appended to
   every document;
3. write: the main process writes tasks in corpus order with megatron-core's own
   ``IndexedDatasetBuilder``; the first ``--split-validation`` documents go to a separate
   validation dataset, the rest to the training dataset;
4. finalize: outputs are written under temporary names and renamed only once complete.

Outputs, for ``--output-prefix P`` (``--json-key`` K, default ``text``):

* without ``--split-validation``: ``P_text_document.{bin,idx}`` (Megatron-LM's naming);
* with ``--split-validation N``: ``P_train_text_document.{bin,idx}`` and
  ``P_valid_text_document.{bin,idx}``.

User errors (missing files, no text field, empty corpus, bad tokenizer directory, missing output
directory, existing outputs without ``--overwrite``) print one ``error:`` line and exit 1.
"""

from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import json
import logging
import lzma
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from megatron_bigmac.data.tokenizer import (
    BACKENDS,
    DEFAULT_TOKENIZER_DIR,
    TokenizerFilesError,
    build_tokenizer,
)

#: File endings of local data files (JSON Lines, optionally compressed; Parquet).
_JSON_SUFFIXES = (".jsonl", ".json")
_COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".xz")
_PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = set("*?[")

#: Tasks handed to workers but not yet written, per worker: enough to keep workers busy while
#: the main process reads, small enough to bound memory on endless hub streams.
_INFLIGHT_PER_WORKER = 3


class PreprocessError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


# --------------------------------------------------------------------------------------------
# Sources: where documents come from. Everything after `iter_tasks` is source-agnostic.
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A resolved ``--dataset``: local data files, or a name for ``datasets.load_dataset``."""

    name: str  # for messages
    format: Optional[str] = None  # "jsonl" or "parquet" for local files; None: hub dataset
    files: List[str] = field(default_factory=list)


def _local_format(path: str) -> Optional[str]:
    """"jsonl" or "parquet" from a local data file's name; None if it is neither."""
    lower = path.lower()
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    for comp in _COMPRESSION_SUFFIXES:
        if any(lower.endswith(s + comp) for s in _JSON_SUFFIXES):
            return "jsonl"
    return None


def resolve_source(datasets: Sequence[str]) -> Source:
    """Decide whether ``--dataset`` names local files/globs or one hub dataset, and check it.

    Local: anything with glob characters, a data-file ending (.jsonl or .json, each optionally
    .gz/.bz2/.xz; .parquet) or an existing file. Anything else is one hub name (or a local
    dataset repository directory), passed to ``datasets.load_dataset`` as is.
    """
    looks_local = [
        bool(_GLOB_CHARS & set(d)) or _local_format(d) is not None or os.path.isfile(d)
        for d in datasets
    ]
    if not any(looks_local):
        if len(datasets) != 1:
            raise PreprocessError(f"give one hub dataset name, got {len(datasets)}: {datasets}")
        return Source(name=datasets[0])

    files: List[str] = []
    for pattern, local in zip(datasets, looks_local):
        if not local:
            raise PreprocessError(f"cannot mix hub dataset {pattern!r} with local files")
        matches = sorted(glob.glob(pattern)) if _GLOB_CHARS & set(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            what = "no files match" if _GLOB_CHARS & set(pattern) else "no such file:"
            raise PreprocessError(f"{what} {pattern!r}")
        files.extend(matches)
    # A file named twice (or matched by two globs) would be read twice, and with
    # --split-validation its first documents would land in both splits: read each file once.
    unique: dict = {}
    for f in files:
        unique.setdefault(os.path.realpath(f), f)
    files = list(unique.values())

    formats = {_local_format(f) for f in files}
    if None in formats:
        odd = next(f for f in files if _local_format(f) is None)
        raise PreprocessError(f"{odd!r} is neither JSONL (.jsonl/.json[.gz|.bz2|.xz]) nor Parquet")
    if len(formats) > 1:
        raise PreprocessError("local files mix JSONL and Parquet: preprocess them separately")
    return Source(name=", ".join(datasets), format=formats.pop(), files=files)


# Local JSONL: the main process only decompresses and cuts the byte stream at line ends; the
# workers parse the JSON, so reading scales with --workers like tokenization does.


@dataclass
class JsonlChunk:
    """Whole lines of one JSONL file, parsed lazily (in a worker) by ``texts``."""

    path: str
    first_line: int  # 1-based line number of the first line, for error messages
    data: bytes
    key: str

    def texts(self) -> List[str]:
        texts = []
        for offset, line in enumerate(self.data.split(b"\n")):
            if not line or line.isspace():
                continue  # blank lines (e.g. a trailing newline) are not documents
            where = f"{self.path}:{self.first_line + offset}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise PreprocessError(f"{where}: not a JSON Lines record ({e})") from None
            if not isinstance(record, dict) or self.key not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise PreprocessError(
                    f"{where}: no {self.key!r} field (fields: {fields}); use --json-key"
                )
            text = record[self.key]
            if not isinstance(text, str):
                raise PreprocessError(f"{where}: {self.key!r} is not a string ({text!r:.40})")
            texts.append(text)
        return texts


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

#: What a worker gets: raw JSONL lines to parse, or texts already read by the main process.
Task = Union[JsonlChunk, List[str]]


def iter_jsonl_chunks(files: Sequence[str], key: str, chunk_bytes: int) -> Iterator[JsonlChunk]:
    """Cut (decompressed) JSONL files into chunks of whole lines of about ``chunk_bytes``."""
    for path in files:
        opener = _OPENERS.get(os.path.splitext(path)[1].lower(), open)
        line = 1
        try:
            with opener(path, "rb") as f:
                rest = b""
                while True:
                    block = f.read(chunk_bytes)
                    data = rest + block
                    cut = data.rfind(b"\n") + 1 if block else len(data)
                    if cut > 0:
                        yield JsonlChunk(path, line, data[:cut], key)
                        line += data.count(b"\n", 0, cut)
                    rest = data[cut:]
                    if not block:
                        break
        except (OSError, EOFError, lzma.LZMAError) as e:  # unreadable or corrupt compression
            raise PreprocessError(f"cannot read {path}: {_one_line(e)}") from None


def iter_parquet_tasks(files: Sequence[str], key: str, task_chars: int) -> Iterator[List[str]]:
    """Text of local Parquet files, column ``key`` only, grouped into tasks."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise _not_installed("Parquet input", "pyarrow", e) from None

    def batches():
        for path in files:
            try:
                f = pq.ParquetFile(path)
            except Exception as e:
                raise PreprocessError(f"cannot read {path}: {_one_line(e)}") from None
            if key not in f.schema_arrow.names:
                raise PreprocessError(
                    f"{path} has no {key!r} column (columns: {', '.join(f.schema_arrow.names)})"
                )
            for batch in f.iter_batches(batch_size=1024, columns=[key]):
                yield path, batch.column(0).to_pylist()

    return _group_texts(batches(), key, task_chars)


# Hugging Face hub datasets (or local dataset repositories): streamed by `datasets`.


def load_hub_dataset(source: Source, args: argparse.Namespace):
    """``datasets.load_dataset`` for a hub name, text column only (streamed by default)."""
    try:
        import datasets
    except ImportError as e:
        raise _not_installed(f"hub dataset {source.name}", "datasets", e) from None

    # We report failures ourselves, in one line; keep the library's own error logs quiet.
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(
            source.name,
            args.dataset_config,
            split=args.dataset_split,
            revision=args.dataset_revision,
            streaming=args.streaming,
        )
    except StopIteration:  # raised while inferring the schema of empty files
        raise PreprocessError(f"empty corpus: no documents in {source.name}") from None
    except Exception as e:  # offline, unknown name/config/split, unsupported format, ...
        raise PreprocessError(f"cannot load {source.name}: {_one_line(e)}") from None
    columns = ds.column_names
    if columns is not None and args.json_key not in columns:
        raise PreprocessError(
            f"{source.name} has no {args.json_key!r} field (fields: {', '.join(columns)}); "
            "use --json-key to pick another"
        )
    return ds.select_columns([args.json_key]) if columns is not None else ds


def iter_hub_tasks(source: Source, args: argparse.Namespace) -> Iterator[List[str]]:
    """Text of a ``datasets`` dataset, grouped into tasks."""
    ds = load_hub_dataset(source, args)

    def batches():
        rows = ds.iter(batch_size=256)
        while True:
            try:
                batch = next(rows)
            except StopIteration:
                return
            except Exception as e:  # malformed files, network errors while streaming, ...
                raise PreprocessError(f"cannot read {source.name}: {_one_line(e)}") from None
            if args.json_key not in batch:
                raise PreprocessError(
                    f"{source.name} has no {args.json_key!r} field (fields: {', '.join(batch)})"
                )
            yield source.name, batch[args.json_key]

    return _group_texts(batches(), args.json_key, args.task_chars)


def _group_texts(
    batches: Iterable[tuple], key: str, task_chars: int
) -> Iterator[List[str]]:
    """Regroup (origin, texts) batches into tasks of about ``task_chars`` characters."""
    task: List[str] = []
    chars = 0
    for origin, texts in batches:
        for text in texts:
            if not isinstance(text, str):
                raise PreprocessError(f"{origin}: a document has no {key!r} text ({text!r:.40})")
            task.append(text)
            chars += len(text)
            if chars >= task_chars:
                yield task
                task, chars = [], 0
    if task:
        yield task


def iter_tasks(source: Source, args: argparse.Namespace) -> Iterator[Task]:
    """The only per-source step: tasks of documents, in corpus order, for the workers."""
    if source.format == "jsonl":
        return iter_jsonl_chunks(source.files, args.json_key, chunk_bytes=args.task_chars)
    if source.format == "parquet":
        return iter_parquet_tasks(source.files, args.json_key, args.task_chars)
    return iter_hub_tasks(source, args)


def _not_installed(what: str, package: str, e: ImportError) -> PreprocessError:
    # `datasets` (and pyarrow with it) comes with the [data] extra, not with a plain install.
    return PreprocessError(f"{what} needs {package}, which is not installed ({e}); "
                           f"pip install -e '.[data]' (or pip install {package})")


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------------
# Tokenization: runs in worker processes (or inline with --workers 0).
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedTask:
    """One task's documents, tokenized: flat ids with an end-of-document token after each."""

    tokens: np.ndarray  # all documents back to back, dtype of the output .bin
    lengths: np.ndarray  # tokens per document, eod included
    text_bytes: int  # UTF-8 bytes of the input texts
    empty_docs: int  # documents with empty text (skipped: they have no tokens)


_worker_tokenizer = None
_worker_dtype = None


def _init_pool_worker(*init_args) -> None:
    # pool.terminate() stops workers with SIGTERM: the main process's handler is not theirs.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(*init_args)


def _init_worker(tokenizer_dir: str, backend: str, dtype: type) -> None:
    """Pool initializer: each worker builds its own tokenizer (cheap, ~0.1 s)."""
    global _worker_tokenizer, _worker_dtype
    # One worker per core already; keep HF tokenizers from starting its own thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = build_tokenizer(tokenizer_dir, backend=backend)
    _worker_dtype = dtype


def tokenize_task(task: Task) -> TokenizedTask:
    """Encode a task's documents and append ``eod`` to each; empty documents are dropped."""
    tok, dtype = _worker_tokenizer, _worker_dtype
    texts = task.texts() if isinstance(task, JsonlChunk) else task
    nonempty, text_bytes = [], 0
    for text in texts:
        if not text:
            continue
        try:
            text_bytes += len(text.encode("utf-8"))
        except UnicodeEncodeError:
            # A lone surrogate (valid JSON: "\ud800") has no UTF-8: replace it with U+FFFD, as
            # tiktoken's encode_ordinary (behind tokenize) does.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            text_bytes += len(text.encode("utf-8"))
        nonempty.append(text)
    docs = tok.tokenize_to_arrays(nonempty)
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    for doc, end in zip(docs, ends.tolist()):
        tokens[end - 1 - len(doc) : end - 1] = doc  # ids < vocab size: the cast is exact
    tokens[ends - 1] = tok.eod
    return TokenizedTask(tokens, lengths, text_bytes, len(texts) - len(nonempty))


# --------------------------------------------------------------------------------------------
# Output: megatron-core builders under temporary names, renamed when complete.
# --------------------------------------------------------------------------------------------


def output_prefixes(output_prefix: str, json_key: str, split_validation: int) -> Dict[str, str]:
    """Final dataset prefixes by split name ("all", or "train" and "valid")."""
    if split_validation > 0:
        return {
            "valid": f"{output_prefix}_valid_{json_key}_document",
            "train": f"{output_prefix}_train_{json_key}_document",
        }
    return {"all": f"{output_prefix}_{json_key}_document"}


def remove_stale_temporaries(prefixes: Dict[str, str], quiet: bool) -> None:
    """Delete the temporary files next to these outputs whose process is gone: SIGKILL (or a
    crash of the machine) leaves them, and on a full corpus each is GBs."""
    for prefix in prefixes.values():
        for ext in ("bin", "idx"):
            for path in glob.glob(glob.escape(f"{prefix}.{ext}.tmp-") + "*"):
                pid = path.rsplit("-", 1)[1]
                if pid.isdigit() and not _alive(int(pid)):
                    os.remove(path)
                    if not quiet:
                        print(f"[preprocess] removed {path} (left by process {pid}, which has "
                              "exited)", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def check_outputs(prefixes: Dict[str, str], overwrite: bool) -> None:
    """Refuse a missing output directory, and existing outputs unless ``overwrite``."""
    for prefix in prefixes.values():
        directory = os.path.dirname(prefix) or "."
        if not os.path.isdir(directory):
            raise PreprocessError(f"output directory {directory!r} does not exist")
        if not overwrite:
            for path in (prefix + ".bin", prefix + ".idx"):
                if os.path.exists(path):
                    raise PreprocessError(f"{path} already exists (pass --overwrite to replace it)")


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0


class IndexedDatasetWriter:
    """Writes documents to one megatron-core indexed dataset per split, atomically.

    Data goes to ``<prefix>.bin.tmp-<pid>``/``<prefix>.idx.tmp-<pid>``; ``commit`` renames them
    to ``<prefix>.bin``/``<prefix>.idx`` (the .idx last, since it is what marks a dataset
    complete) and ``abort`` deletes them, so no partial output ever has a valid-looking name.
    """

    def __init__(self, prefixes: Dict[str, str], dtype: type):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefixes = prefixes
        self.stats = {split: SplitStats() for split in prefixes}
        suffix = f".tmp-{os.getpid()}"
        self._tmp = {s: (p + ".bin" + suffix, p + ".idx" + suffix) for s, p in prefixes.items()}
        self._builders = {}
        try:
            for split, (tmp_bin, _) in self._tmp.items():
                self._builders[split] = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        except OSError as e:
            self.abort()
            raise PreprocessError(f"cannot write output: {_one_line(e)}") from None

    def add(self, split: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (``tokens`` back to back, ``lengths`` per document) to ``split``."""
        builder = self._builders[split]
        start = 0
        try:
            for length in lengths.tolist():
                builder.add_document(tokens[start : start + length], [length])
                start += length
        except OSError as e:  # a full disk, a quota
            raise PreprocessError(f"cannot write output: {_one_line(e)}") from None
        self.stats[split].documents += len(lengths)
        self.stats[split].tokens += start

    def commit(self) -> None:
        try:
            self._commit()
        except OSError as e:
            raise PreprocessError(f"cannot write output: {_one_line(e)}") from None

    def _commit(self) -> None:
        for split, builder in self._builders.items():
            builder.finalize(self._tmp[split][1])
        # A dataset is valid when its .idx exists: remove every old .idx first and write the new
        # ones last, so a crash in between never pairs a new .bin with an old .idx, nor a new
        # split with an old one.
        for prefix in self.prefixes.values():
            if os.path.exists(prefix + ".idx"):
                os.remove(prefix + ".idx")
        for split, prefix in self.prefixes.items():
            os.replace(self._tmp[split][0], prefix + ".bin")
        for split, prefix in self.prefixes.items():
            os.replace(self._tmp[split][1], prefix + ".idx")
        self._builders = {}

    def abort(self) -> None:
        for builder in self._builders.values():
            try:
                builder.data_file.close()
            except OSError:  # its last flush, on a full disk: the file is deleted below anyway
                pass
        self._builders = {}
        for paths in self._tmp.values():
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)


# --------------------------------------------------------------------------------------------
# Progress and summary (stderr).
# --------------------------------------------------------------------------------------------


class Progress:
    """Periodic docs/s and tokens/s on stderr: a rewritten line on a terminal, else a log line."""

    def __init__(self, enabled: bool, interval: Optional[float] = None):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.start = time.perf_counter()
        self._last = self.start
        self.documents = self.tokens = self.text_bytes = 0

    def update(self, documents: int, tokens: int, text_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.text_bytes += text_bytes
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._print(now - self.start, end="\r" if self.tty else "\n")

    def _print(self, elapsed: float, end: str) -> None:
        rate = max(elapsed, 1e-9)
        print(
            f"[preprocess] {self.documents:,} docs ({self.documents / rate:,.0f} docs/s), "
            f"{self.tokens / 1e6:,.2f} M tokens ({self.tokens / rate / 1e6:,.2f} M tokens/s), "
            f"{self.text_bytes / 1e6:,.1f} MB text, {elapsed:,.1f} s",
            file=sys.stderr,
            end=end,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


@dataclass
class Summary:
    """What a run produced; printed at the end and returned by ``preprocess``."""

    documents: int
    tokens: int  # end-of-document tokens included
    text_bytes: int
    empty_documents: int
    elapsed_s: float
    outputs: Dict[str, str]  # split -> prefix
    splits: Dict[str, SplitStats]
    backend: str
    workers: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s

    def print(self, file=None) -> None:
        file = file or sys.stderr  # looked up per call: tests and callers may swap sys.stderr
        print(
            f"[preprocess] done: {self.documents:,} documents, {self.tokens:,} tokens "
            f"(incl. {self.documents:,} <|endoftext|>), {self.text_bytes / 1e6:,.2f} MB text, "
            f"{self.elapsed_s:.2f} s: {self.tokens_per_s / 1e6:.2f} M tokens/s, "
            f"{self.documents / self.elapsed_s:,.0f} docs/s "
            f"({self.backend}, {self.workers} workers)",
            file=file,
        )
        if self.empty_documents:
            print(f"[preprocess] skipped {self.empty_documents:,} empty documents", file=file)
        for split, prefix in self.outputs.items():
            stats = self.splits[split]
            print(
                f"[preprocess]   {split}: {prefix}.{{bin,idx}}: {stats.documents:,} documents, "
                f"{stats.tokens:,} tokens",
                file=file,
            )


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def _results(tasks: Iterable[Task], workers: int, init_args: tuple) -> Iterator[TokenizedTask]:
    """Tokenized tasks in input order: inline, or through a pool with bounded tasks in flight."""
    if workers == 0:
        _init_worker(*init_args)
        yield from map(tokenize_task, tasks)
        return
    # fork: workers start in milliseconds and inherit the imported modules; it happens before
    # `datasets`/pyarrow start any thread. Elsewhere fall back to the platform default.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ctx.Pool(workers, initializer=_init_pool_worker, initargs=init_args)
    try:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(tokenize_task, (task,)))
            if len(pending) >= _INFLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def preprocess(args: argparse.Namespace) -> Summary:
    """Run the whole pipeline for parsed CLI arguments; raise ``PreprocessError`` on bad input."""
    start = time.perf_counter()
    if args.split_validation < 0:
        raise PreprocessError("--split-validation must be >= 0")
    if args.workers < 0:
        raise PreprocessError("--workers must be >= 0")
    if args.task_chars < 1:
        raise PreprocessError("--task-chars must be >= 1")
    if not os.path.basename(args.output_prefix):  # "out/" would write out/_text_document.*
        raise PreprocessError(f"--output-prefix {args.output_prefix!r} ends in a path separator: "
                              "add a file name prefix, e.g. out/corpus")

    # Check everything the user gave before any work starts.
    try:
        tokenizer = build_tokenizer(args.tokenizer, backend=args.tokenizer_backend)
    except (TokenizerFilesError, RuntimeError) as e:  # bad files; backend giving wrong ids
        raise PreprocessError(str(e)) from None
    except ImportError as e:
        raise PreprocessError(
            f"tokenizer backend {args.tokenizer_backend!r} is not installed ({e}); "
            "pip install 'megatron-bigmac[data]'"
        ) from None
    prefixes = output_prefixes(args.output_prefix, args.json_key, args.split_validation)
    check_outputs(prefixes, args.overwrite)
    source = resolve_source(args.dataset)

    from megatron.core.datasets.indexed_dataset import DType

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    init_args = (str(tokenizer.tokenizer_dir), tokenizer.backend, dtype)
    progress = Progress(enabled=not args.quiet, interval=args.log_interval)
    writer = None
    try:
        # The pool is forked inside `_results` before the first `next`, i.e. before loading.
        results = _results(_lazy_tasks(source, args), args.workers, init_args)
        writer = IndexedDatasetWriter(prefixes, dtype)
        empty = 0
        for result in results:
            _write(writer, result, args.split_validation)
            empty += result.empty_docs
            progress.update(len(result.lengths), len(result.tokens), result.text_bytes)
        progress.close()
        _check_counts(writer, source, args.split_validation)
        writer.commit()
    except BaseException:
        progress.close()
        if writer is not None:
            writer.abort()
        raise

    return Summary(
        documents=progress.documents,
        tokens=progress.tokens,
        text_bytes=progress.text_bytes,
        empty_documents=empty,
        elapsed_s=time.perf_counter() - start,
        outputs=prefixes,
        splits=writer.stats,
        backend=tokenizer.backend,
        workers=args.workers,
    )


def _lazy_tasks(source: Source, args: argparse.Namespace) -> Iterator[Task]:
    """Open the source only when the first task is requested (after the pool has forked)."""
    yield from iter_tasks(source, args)


def _write(writer: IndexedDatasetWriter, result: TokenizedTask, split_validation: int) -> None:
    """Route a task's documents: the first ``split_validation`` documents overall to "valid"."""
    if split_validation == 0:
        writer.add("all", result.tokens, result.lengths)
        return
    n_valid = min(split_validation - writer.stats["valid"].documents, len(result.lengths))
    if n_valid > 0:
        cut = int(result.lengths[:n_valid].sum())
        writer.add("valid", result.tokens[:cut], result.lengths[:n_valid])
        result = TokenizedTask(result.tokens[cut:], result.lengths[n_valid:], 0, 0)
    if len(result.lengths):
        writer.add("train", result.tokens, result.lengths)


def _check_counts(writer: IndexedDatasetWriter, source: Source, split_validation: int) -> None:
    total = sum(s.documents for s in writer.stats.values())
    if total == 0:
        raise PreprocessError(f"empty corpus: no documents with text in {source.name}")
    if split_validation and writer.stats["train"].documents == 0:
        raise PreprocessError(
            f"only {total:,} documents: cannot hold out {split_validation:,} for validation "
            "and keep any for training"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_bigmac.data.preprocess",
        description="Tokenize a corpus with the GPT-2 BPE into megatron-core indexed datasets.",
    )
    p.add_argument(
        "--dataset", nargs="+", required=True,
        help="a Hugging Face dataset name (e.g. wikimedia/wikipedia) or local dataset repo "
        "directory, or local JSONL(.gz/.bz2/.xz)/Parquet files and globs",
    )
    p.add_argument("--dataset-config", default=None,
                   help="hub dataset configuration, e.g. 20231101.en for wikimedia/wikipedia")
    p.add_argument("--dataset-split", default="train", help="hub dataset split (default: train)")
    p.add_argument("--dataset-revision", default=None, help="hub dataset revision (branch/commit)")
    p.add_argument("--no-streaming", dest="streaming", action="store_false",
                   help="download and cache a hub dataset first instead of streaming it")
    p.add_argument("--json-key", default="text", help="field holding the document text")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER_DIR),
                   help="directory with GPT-2 vocab.json and merges.txt "
                   "(default: the copy shipped in the package)")
    p.add_argument("--tokenizer-backend", choices=BACKENDS, default="auto",
                   help="auto: tiktoken if installed, else Hugging Face tokenizers")
    p.add_argument("--output-prefix", required=True,
                   help="output path prefix; its directory must exist")
    p.add_argument("--split-validation", type=int, default=0, metavar="N",
                   help="hold out the first N documents as a separate validation dataset")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: CPU count; 0 tokenizes in-process)")
    p.add_argument("--task-chars", type=int, default=1 << 21,
                   help="characters of text per worker task (default: 2 Mi)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--log-interval", type=float, default=None, metavar="SECONDS",
                   help="seconds between progress lines (default: 0.5 on a terminal, else 10)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (summary only)")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's time limit, scancel, timeout, docker stop): stop as on Ctrl-C, so the
    temporary files are removed."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        # Here, not in preprocess(): the trainer runs that once per host, where a pid of another
        # host sharing the cache is not ours to judge.
        remove_stale_temporaries(
            output_prefixes(args.output_prefix, args.json_key, args.split_validation), args.quiet)
        summary = preprocess(args)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print("error: terminated (SIGTERM); no output written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

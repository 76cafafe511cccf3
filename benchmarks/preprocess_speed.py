"""End-to-end preprocessing speed: ours vs Megatron-LM's ``tools/preprocess_data.py``.

Runs each tool as a user would (a fresh ``python`` process: interpreter start, imports, reading,
tokenizing, writing ``.bin``/``.idx``) on the same files, times the wall clock, counts the tokens
written and checks that the outputs are byte-identical. Prints one line per run:

    python benchmarks/preprocess_speed.py                       # ours only (both backends)
    python benchmarks/preprocess_speed.py --megatron-lm /path/to/Megatron-LM \\
        [--megatron-lm-pythonpath /path/to/extra/site]          # + Megatron-LM, same files

Defaults: the five enwiki train shards of ../shared/data (27.1 M GPT-2 tokens), ``--workers``
= CPU count for both tools. Megatron-LM's tool reads one uncompressed JSONL file, so the shards are
decompressed and concatenated for it first; that step is timed and reported separately. It runs
with ``--legacy-tokenizer`` (Megatron's own GPT-2 BPE from the vocab/merges files), because its
default tokenizer path loads ``gpt2`` through Hugging Face ``transformers`` from the hub.
Its ``megatron.training`` package imports ``triton``; on a CPU-only machine without it, install it
aside (``pip install --target DIR triton``) and pass ``--megatron-lm-pythonpath DIR``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_FILES = str(SHARED / "enwiki" / "enwiki-2015-train-*-of-00005.jsonl.gz")
TOKENIZER_DIR = REPO / "megatron_bigmac" / "assets" / "gpt2"


def count_tokens(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of a megatron indexed dataset, read from its .idx header/arrays."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return len(ds), int(np.asarray(ds.sequence_lengths).sum())


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    """Run a command; return (wall seconds, stderr + stdout). Raise if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = proc.stderr + proc.stdout
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return wall, output


def report(name: str, wall: float, docs: int, tokens: int, extra: str = "") -> None:
    print(
        f"{name:<34} {wall:7.2f} s wall  {tokens / wall / 1e6:6.2f} M tokens/s  "
        f"({docs:,} docs, {tokens:,} tokens){extra}",
        flush=True,
    )


def run_ours(files, out: Path, workers: int, backend: str, env: dict) -> str:
    prefix = out / f"ours_{backend}"
    cmd = [sys.executable, "-m", "megatron_bigmac.data.preprocess", "--dataset", *files,
           "--tokenizer", str(TOKENIZER_DIR), "--output-prefix", str(prefix),
           "--workers", str(workers), "--tokenizer-backend", backend, "--quiet"]
    wall, output = timed(cmd, env, REPO)
    # Our summary's own clock starts after the interpreter and megatron-core imports.
    m = re.search(r"done: .*?([\d.]+) s: ([\d.]+) M tokens/s", output)
    docs, tokens = count_tokens(f"{prefix}_text_document")
    extra = f"; pipeline {m.group(1)} s = {m.group(2)} M tokens/s" if m else ""
    report(f"ours ({backend}, {workers} workers)", wall, docs, tokens, extra)
    return f"{prefix}_text_document"


def run_megatron_lm(files, out: Path, workers: int, mlm: Path, env: dict, extra_path) -> str:
    # Its input: one uncompressed JSONL (what its README asks for), made here and timed apart.
    jsonl = out / "all.jsonl"
    start = time.perf_counter()
    with open(jsonl, "wb") as dst:
        for f in files:
            with (gzip.open(f, "rb") if f.endswith(".gz") else open(f, "rb")) as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    print(f"{'(decompress + concatenate input)':<34} {time.perf_counter() - start:7.2f} s",
          flush=True)

    prefix = out / "megatron_lm"
    env = dict(env)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(mlm / "tools" / "preprocess_data.py"), "--input", str(jsonl),
           "--output-prefix", str(prefix), "--tokenizer-type", "GPT2BPETokenizer",
           "--vocab-file", str(TOKENIZER_DIR / "vocab.json"),
           "--merge-file", str(TOKENIZER_DIR / "merges.txt"),
           "--append-eod", "--workers", str(workers), "--legacy-tokenizer"]
    # Megatron-LM's own directory as cwd: its tool puts its parent on sys.path.
    wall, _ = timed(cmd, env, mlm)
    docs, tokens = count_tokens(f"{prefix}_text_document")
    report(f"Megatron-LM preprocess_data.py ({workers} w)", wall, docs, tokens)
    return f"{prefix}_text_document"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", nargs="+", default=[DEFAULT_FILES],
                   help="JSONL(.gz) files or globs (default: the 5 enwiki train shards)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--backends", nargs="+", default=["tiktoken", "tokenizers"],
                   choices=["tiktoken", "tokenizers"], help="our tokenizer backends to time")
    p.add_argument("--megatron-lm", type=Path, default=None,
                   help="a Megatron-LM checkout: also time its tools/preprocess_data.py")
    p.add_argument("--megatron-lm-pythonpath", default=None,
                   help="extra PYTHONPATH for Megatron-LM only (e.g. a --target dir with triton)")
    p.add_argument("--workdir", type=Path, default=None, help="keep outputs here")
    args = p.parse_args()

    import glob

    files = sorted(f for pattern in args.files for f in (glob.glob(pattern) or [pattern]))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        sys.exit(f"error: missing input {missing[0]} (../shared/data is needed for the default)")
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    text_mb = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"{len(files)} files ({text_mb:.1f} MB on disk), {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}", flush=True)

    out = args.workdir or Path(tempfile.mkdtemp(prefix="preprocess_speed_"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        outputs = [run_ours(files, out, args.workers, b, env) for b in args.backends]
        if args.megatron_lm is not None:
            outputs.append(run_megatron_lm(files, out, args.workers, args.megatron_lm, env,
                                           args.megatron_lm_pythonpath))
        blobs = [(Path(o + ".bin").read_bytes(), Path(o + ".idx").read_bytes()) for o in outputs]
        same = all(b == blobs[0] for b in blobs)
        print(f"outputs byte-identical across all runs: {same}")
    finally:
        if args.workdir is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Data pipeline: GPT-2 tokenizer, corpus -> megatron-core indexed dataset, bad inputs.

Uses the sample shipped in the package, small files made here, and (where present) the offline
data in ../shared/data beside the repository, whose README gives the expected counts.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Never reach for the hub: the hub code path is exercised with a local dataset repository.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.utils import Split
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_bigmac.data import GPT2_EOD_ID, build_tokenizer
from megatron_bigmac.data.preprocess import build_parser, main as preprocess_main
from megatron_bigmac.data.tokenizer import DEFAULT_TOKENIZER_DIR, TokenizerFilesError
from megatron_bigmac.training import data as training_data
from megatron_bigmac.training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "megatron_bigmac" / "assets" / "sample"
SAMPLE_TRAIN = SAMPLE / "enwiki-2015-sample-train.jsonl.gz"
SAMPLE_VALID = SAMPLE / "enwiki-2015-sample-valid.jsonl.gz"
WIKITEXT = SAMPLE / "wikitext-2-raw-v1-test.articles.jsonl.gz"
TINY = REPO / "configs" / "tiny" / "bigmac.yaml"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

needs_shared = pytest.mark.skipif(
    not (SHARED / "README.md").is_file(),
    reason=f"offline data {SHARED} not present (it sits beside the repository on CI)",
)


def read_texts(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_jsonl(path, records):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def run(capsys, *argv):
    """Run the CLI in-process; return (exit code, stderr)."""
    code = preprocess_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def read_docs(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def expected_docs(tokenizer, texts):
    return [ids + [GPT2_EOD_ID] for ids in tokenizer.tokenize_batch(texts)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])
def test_hello_world(backend):
    tok = build_tokenizer(backend=backend)
    assert tok.backend == backend
    assert tok.tokenize("Hello world") == [15496, 995]
    assert tok.detokenize([15496, 995]) == "Hello world"
    assert (tok.vocab_size, tok.eod, tok.eos, tok.bos) == (50257, 50256, 50256, 50256)


def test_megatron_tokenizer_interface(tok):
    # One object for the trainer, Megatron-LM and GPTDataset: megatron-core's tokenizer API.
    assert isinstance(tok, MegatronTokenizerBase)
    assert tok.vocab["<|endoftext|>"] == 50256 and tok.inv_vocab[995] == "Ġworld"
    assert Path(tok.vocab_file).parent == DEFAULT_TOKENIZER_DIR
    json.dumps(tok.unique_identifiers)  # megatron-core hashes it for its dataset caches
    with pytest.raises(AttributeError):
        tok.pad  # no pad token: GPTDataset then uses its own pad id
    # A literal end-of-text marker inside a document is ordinary text, not the eod id.
    assert GPT2_EOD_ID not in tok.tokenize("a <|endoftext|> b")


def test_backends_agree_on_sample(tok):
    texts = read_texts(SAMPLE_TRAIN)[:80] + read_texts(WIKITEXT) + ["", " \n ", "<|endoftext|>"]
    ids = tok.tokenize_batch(texts)
    assert build_tokenizer(backend="tokenizers").tokenize_batch(texts) == ids
    # The workers' fast path (numpy arrays) gives the same ids.
    assert [a.tolist() for a in tok.tokenize_to_arrays(texts)] == ids


def test_tokenizer_dir_errors(tmp_path):
    with pytest.raises(TokenizerFilesError, match="does not exist"):
        build_tokenizer(tmp_path / "nope")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerFilesError, match="lacks merges.txt"):
        build_tokenizer(tmp_path)


# ------------------------------------------------------------------- round trip and GPTDataset


def test_round_trip_with_validation_split(tmp_path, capsys, tok):
    prefix = tmp_path / "wiki"
    code, err = run(capsys, "--dataset", SAMPLE_TRAIN, "--output-prefix", prefix,
                    "--split-validation", 20, "--workers", 2, "--task-chars", 100_000,
                    "--log-interval", 0)
    assert code == 0, err
    progress = [line for line in err.splitlines() if "docs/s" in line and "done" not in line]
    assert progress and all("M tokens/s" in line for line in progress)
    assert "done: 261 documents, 793,562 tokens" in err  # 793,301 + 261 <|endoftext|>
    expected = expected_docs(tok, read_texts(SAMPLE_TRAIN))
    # Held out by whole documents: the first 20 go to validation, the rest to training.
    assert read_docs(f"{prefix}_valid_text_document") == expected[:20]
    assert read_docs(f"{prefix}_train_text_document") == expected[20:]
    assert IndexedDataset(f"{prefix}_train_text_document").index.dtype == np.uint16
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"wiki_{s}_text_document.{e}" for s in ("train", "valid") for e in ("bin", "idx")
    ]


def test_a_file_named_twice_is_read_once_so_validation_never_leaks(tmp_path, capsys, tok):
    docs = [{"text": f"document number {i}"} for i in range(6)]
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    prefix = tmp_path / "dup"
    code, err = run(capsys, "--dataset", src, str(tmp_path / "*.jsonl"), "--output-prefix", prefix,
                    "--split-validation", 2)
    assert code == 0, err
    valid, train = read_docs(f"{prefix}_valid_text_document"), read_docs(f"{prefix}_train_text_document")
    assert len(valid) == 2 and len(train) == 4
    assert not set(map(tuple, valid)) & set(map(tuple, train))


def test_gpt_dataset_reads_output(tmp_path, capsys, tok):
    prefix = tmp_path / "v"
    assert run(capsys, "--dataset", SAMPLE_VALID, "--output-prefix", prefix, "--workers", 0)[0] == 0
    path = f"{prefix}_text_document"
    indexed = IndexedDataset(path)
    seq = 64
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq, blend=([path], None), split="1,0,0",
        tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=None,
    )
    gpt = GPTDataset(indexed, path, np.arange(len(indexed), dtype=np.int32), None, Split.train,
                     config)
    # Every sample is the window that GPTDataset's indices point at in the stream of our own
    # tokenizer's documents (in GPTDataset's shuffled document order).
    docs = expected_docs(tok, read_texts(SAMPLE_VALID))
    stream = np.concatenate([docs[d] for d in gpt.document_index])
    starts = np.concatenate([[0], np.cumsum([len(docs[d]) for d in gpt.document_index])])
    assert len(gpt) == (len(stream) - 1) // seq
    for i in range(0, len(gpt), 7):
        doc_pos, offset = gpt.sample_index[gpt.shuffle_index[i]]
        start = starts[doc_pos] + offset
        sample = gpt[i]
        assert sample["tokens"].tolist() == stream[start : start + seq].tolist()
        assert sample["labels"].tolist() == stream[start + 1 : start + seq + 1].tolist()


def test_sources_and_backends_give_identical_files(tmp_path, capsys):
    """Hub path (a local dataset repo), Parquet, workers and tokenizer backends: same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = read_texts(SAMPLE_VALID)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(SAMPLE_VALID, repo / "data" / "part-0.jsonl.gz")
    # The hub layout of a named config, as wikimedia/wikipedia has for 20231101.en.
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: 20231101.en\n  data_files:\n  - split: train\n"
        "    path: data/*.jsonl.gz\n---\n"
    )
    parquet = tmp_path / "v.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), parquet)

    runs = {
        "jsonl": ["--dataset", SAMPLE_VALID],
        "jsonl-inline": ["--dataset", SAMPLE_VALID, "--workers", 0],
        "jsonl-hf-tokenizers": ["--dataset", SAMPLE_VALID, "--tokenizer-backend", "tokenizers"],
        "parquet": ["--dataset", parquet],
        "hub": ["--dataset", repo, "--dataset-config", "20231101.en"],
    }
    outputs = {}
    for name, argv in runs.items():
        out = tmp_path / name
        code, err = run(capsys, *argv, "--output-prefix", out, "--split-validation", 3, "--quiet")
        assert code == 0, (name, err)
        outputs[name] = [
            Path(f"{out}_{s}_text_document.{e}").read_bytes()
            for s in ("train", "valid") for e in ("bin", "idx")
        ]
    for name in runs:
        assert outputs[name] == outputs["jsonl"], name


def test_cli_module_entry_point(tmp_path):
    """`python -m megatron_bigmac.data.preprocess` as documented: output and a one-line error."""
    # megatron-core warns at import time when Transformer Engine/Apex are absent (not ours).
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megatron_bigmac.data.preprocess", "--tokenizer",
           str(DEFAULT_TOKENIZER_DIR), "--dataset"]
    ok = subprocess.run(cmd + [str(WIKITEXT), "--output-prefix", str(tmp_path / "w")], cwd=REPO,
                        env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "done: 60 documents, 283,347 tokens" in ok.stderr  # 283,287 + 60 <|endoftext|>
    bad = subprocess.run(cmd + [str(tmp_path / "missing.jsonl"), "--output-prefix",
                                str(tmp_path / "bad")], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.strip()] == [
        f"error: no such file: {str(tmp_path / 'missing.jsonl')!r}"
    ]


# --------------------------------------------------------------------------------- bad inputs


def _bad_input_cases(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "one"}, {"text": "two"}])
    notext = write_jsonl(tmp_path / "notext.jsonl.gz", [{"title": "a", "body": "b"}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    no_tok = tmp_path / "tok"
    no_tok.mkdir()
    (no_tok / "vocab.json").write_text("{}")
    existing = tmp_path / "out" / "x"
    return {
        "missing file": (["--dataset", tmp_path / "nope.jsonl.gz"], "no such file"),
        "glob matches nothing": (["--dataset", tmp_path / "*.parquet"], "no files match"),
        "no text field": (["--dataset", notext], "no 'text' field (fields: title, body)"),
        "empty corpus": (["--dataset", empty], "empty corpus"),
        "only empty texts": (["--dataset", blank], "empty corpus"),
        "not JSON": (["--dataset", tmp_path / "broken.jsonl"], "broken.jsonl:2: not a JSON"),
        "tokenizer dir without files": (
            ["--dataset", good, "--tokenizer", no_tok], "lacks merges.txt"),
        "tokenizer dir missing": (
            ["--dataset", good, "--tokenizer", tmp_path / "none"], "does not exist"),
        "output dir missing": (
            ["--dataset", good, "--output-prefix", tmp_path / "nodir" / "x"],
            "output directory"),
        "validation takes everything": (
            ["--dataset", good, "--split-validation", 2], "cannot hold out 2"),
        "hub unreachable": (
            ["--dataset", "wikimedia/wikipedia", "--dataset-config", "20231101.en"],
            "cannot load wikimedia/wikipedia"),
        "no task chars": (["--dataset", good, "--task-chars", 0], "--task-chars must be >= 1"),
        "negative task chars": (
            ["--dataset", good, "--task-chars", -5], "--task-chars must be >= 1"),
        "output prefix is a directory": (
            ["--dataset", good, "--output-prefix", f"{tmp_path / 'out'}{os.sep}"],
            "ends in a path separator"),
        "zstd": (["--dataset", tmp_path / "a.jsonl.zst"], "is neither JSONL"),
    }, existing


def test_bad_inputs(tmp_path, capsys):
    cases, _ = _bad_input_cases(tmp_path)
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    assert ".zst" not in " ".join(build_parser().format_help().split())  # the help says so too
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, (argv, message) in cases.items():
        if "--output-prefix" not in argv:
            argv = argv + ["--output-prefix", out_dir / "x"]
        code, err = run(capsys, *argv, "--workers", 1)
        lines = err.strip().splitlines()
        assert code == 1, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            name, err)
        # Nothing left behind: no output, no temporary file.
        assert list(out_dir.iterdir()) == [], name


def test_existing_output_needs_overwrite(tmp_path, capsys, tok):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "Hello world"}])
    prefix = tmp_path / "x"
    assert run(capsys, "--dataset", src, "--output-prefix", prefix)[0] == 0
    before = Path(f"{prefix}_text_document.bin").read_bytes()

    write_jsonl(src, [{"text": "Hello world"}, {"text": "again"}])
    code, err = run(capsys, "--dataset", src, "--output-prefix", prefix)
    assert code == 1 and "already exists (pass --overwrite" in err
    assert Path(f"{prefix}_text_document.bin").read_bytes() == before  # untouched

    assert run(capsys, "--dataset", src, "--output-prefix", prefix, "--overwrite")[0] == 0
    again = tok.tokenize("again") + [GPT2_EOD_ID]
    assert read_docs(f"{prefix}_text_document") == [[15496, 995, GPT2_EOD_ID], again]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.jsonl", "x_text_document.bin", "x_text_document.idx"]


# ------------------------------------------------------------- ../shared/data against its README


@needs_shared
@pytest.mark.parametrize(
    "relpath, docs, tokens",
    [
        ("enwiki/enwiki-2015-sample.jsonl.gz", 289, 869_830),
        ("wikitext/wikitext-2-raw-v1-test.articles.jsonl.gz", 60, 283_287),
        ("openwebtext/openwebtext-10k-first1000.jsonl.gz", 1000, 1_053_999),
    ],
)
def test_shared_file_counts(tok, relpath, docs, tokens):
    texts = read_texts(SHARED / relpath)
    assert len(texts) == docs
    assert sum(map(len, tok.tokenize_batch(texts))) == tokens


@needs_shared
def test_shared_train_shards(tmp_path, capsys):
    """Document counts of all five shards; tokens of shard 0 through the whole pipeline."""
    shards = sorted((SHARED / "enwiki").glob("enwiki-2015-train-*-of-00005.jsonl.gz"))
    assert [sum(1 for _ in gzip.open(s)) for s in shards] == [1934, 1869, 1886, 1835, 1843]
    prefix = tmp_path / "shard0"
    code, err = run(capsys, "--dataset", shards[0], "--output-prefix", prefix, "--quiet")
    assert code == 0, err
    ds = IndexedDataset(f"{prefix}_text_document")
    assert len(ds) == 1934
    assert int(ds.sequence_lengths.sum()) == 5_420_616 + 1934  # README tokens + one eod per doc


# ------------------------------------------------- training/data.py: prefixes checked at startup


def run_config(tmp_path, *overrides):
    """The tiny config on one CPU process, its cache under tmp_path."""
    return load_config(TINY, ["expert_model_parallel_size=1", f"data_cache_path={tmp_path}/cache",
                              *overrides], world_size=1, cuda=False)


def write_dataset(prefix, docs, dtype=np.uint16):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_a_split_without_documents_is_refused_before_it_hangs(tmp_path):
    # megatron-core builds every split of nonzero weight, and loops forever in
    # GPTDataset._get_num_epochs on one without documents. 969,30,1 of the 261 shipped documents
    # gives the test split round(261 * 1.0) - round(261 * 0.999) = 0 of them.
    data_path = ["train_data_path=[]", "valid_data_path=[]"]
    cfg = run_config(tmp_path, "data_path=[sample:enwiki-2015-sample-train]", *data_path)
    with pytest.raises(ConfigError, match=(
            r"^split: '969,30,1' leaves the test split of data_path "
            r"sample:enwiki-2015-sample-train empty \(261 documents: 253 train, 8 valid, 0 test\)")):
        training_data.check_prefixes(cfg, samples=False)  # the sample is not tokenized yet
    # A prefix on disk: the counts come from its .idx.
    prefix = write_dataset(tmp_path / "ten", [[1, 2, 3]] * 10)
    cfg = run_config(tmp_path, f"data_path=[{prefix}]", *data_path, "split=98,2,0")
    with pytest.raises(ConfigError, match=r"valid split .* \(10 documents: 10 train, 0 valid, 0 test\)"):
        training_data.check_prefixes(cfg)
    training_data.check_prefixes(run_config(tmp_path, f"data_path=[{prefix}]", *data_path,
                                            "split=8,2,0"))  # no test split: nothing to build
    # Nor a train_data_path/valid_data_path prefix without any document.
    empty = write_dataset(tmp_path / "none", [])
    with pytest.raises(ConfigError, match=f"^valid_data_path: {empty} holds no documents$"):
        training_data.check_prefixes(run_config(tmp_path, f"train_data_path=[{prefix}]",
                                                f"valid_data_path=[{empty}]"))


def test_a_misspelt_sample_is_refused_by_the_early_check(tmp_path):
    cfg = run_config(tmp_path, "train_data_path=[sample:enwiki-2015-sample-trian]")
    with pytest.raises(FileNotFoundError, match=(
            r"^train_data_path: sample:enwiki-2015-sample-trian: no shipped sample of that name "
            r"\(have enwiki-2015-sample-train, enwiki-2015-sample-valid, "
            r"wikitext-2-raw-v1-test.articles\)$")):
        training_data.check_prefixes(cfg, samples=False)


@pytest.mark.parametrize("damage, message", [
    ("truncate .bin", r"d\.bin has 30 bytes, its \.idx needs 60 \(truncated"),
    ("truncate .idx", r"d\.idx is truncated \(\d+ bytes, its header needs \d+\)"),
    ("garbage .idx", r"d\.idx is not a megatron-core index"),
], ids=["bin", "idx", "garbage"])
def test_a_damaged_dataset_is_refused_naming_the_file(tmp_path, damage, message):
    # Else a truncated .bin fails only when a sample touching the missing bytes is read, which on
    # a large corpus can be hours into the run.
    valid = write_dataset(tmp_path / "v", [[1, 2, 3]] * 10)
    prefix = write_dataset(tmp_path / "d", [[1, 2, 3]] * 10)  # 30 uint16 tokens: 60 bytes
    path = prefix + damage[-4:]
    if damage.startswith("truncate"):
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        Path(path).write_bytes(b"not an index, not even close to one")
    cfg = run_config(tmp_path, f"train_data_path=[{prefix}]", f"valid_data_path=[{valid}]")
    with pytest.raises(ConfigError, match=f"^train_data_path: {tmp_path}/{message}"):
        training_data.check_prefixes(cfg)
    training_data.check_prefixes(run_config(tmp_path, f"train_data_path=[{valid}]",
                                            f"valid_data_path=[{valid}]"))


def test_token_ids_must_fit_the_tokenizers_vocabulary(tmp_path):
    from megatron_bigmac.training.model import padded_vocab_size

    valid = write_dataset(tmp_path / "v", [[1, 2, 3]])
    ok = write_dataset(tmp_path / "ok", [[0, 15496, 995, GPT2_EOD_ID]] * 3)
    big = write_dataset(tmp_path / "big", [[15496, 995], [50400, GPT2_EOD_ID]])  # another vocab
    data = [f"valid_data_path=[{valid}]"]
    training_data.check_prefixes(run_config(tmp_path, f"train_data_path=[{ok}]", *data))
    gpt2 = run_config(tmp_path, f"train_data_path=[{big}]", *data)
    with pytest.raises(ConfigError, match=(
            f"^train_data_path: {big}.bin holds token id 50,400, outside the 50,257-token "
            "vocabulary of the GPT-2 BPE")):
        training_data.check_prefixes(gpt2)
    assert padded_vocab_size(gpt2) == 50304
    # A BPE with 200 more tokens: the embedding grows to hold them, and so do the allowed ids.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    vocab = json.loads((DEFAULT_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    vocab.update({f"<|extra{i}|>": 50257 + i for i in range(200)})
    (tok_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(DEFAULT_TOKENIZER_DIR / "merges.txt", tok_dir)
    larger = run_config(tmp_path, f"train_data_path=[{big}]", *data, f"tokenizer_dir={tok_dir}")
    assert padded_vocab_size(larger) == 50560  # 50,457 up to a multiple of 128
    training_data.check_prefixes(larger)


# -------------------------------------------------------------- preprocess: odd inputs and exits


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])
def test_a_lone_surrogate_is_replaced_as_tiktoken_does(tmp_path, capsys, tok, backend):
    # Valid JSON ("\ud800" escapes) but not encodable as UTF-8: each lone surrogate becomes
    # U+FFFD, as tiktoken's encode_ordinary (behind tok.tokenize) repairs it.
    texts = ["a \ud800 b", "pair \ud83d\ude00 and lone low \udc00", "fine"]
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert "\\ud800" in src.read_text()
    code, err = run(capsys, "--dataset", src, "--output-prefix", tmp_path / "s", "--workers", 1,
                    "--tokenizer-backend", backend)
    assert code == 0, err
    repaired = ["a \ufffd b", "pair \U0001f600 and lone low \ufffd", "fine"]
    assert read_docs(f"{tmp_path}/s_text_document") == expected_docs(tok, repaired)
    assert [tok.tokenize(t) for t in texts] == [tok.tokenize(t) for t in repaired]


def test_sigterm_removes_the_temporary_files(tmp_path):
    # Slurm's time limit, scancel, timeout and docker stop send SIGTERM: clean up as on Ctrl-C.
    script = (
        "import os, signal, sys\n"
        "from megatron_bigmac.data import preprocess\n"
        "write = preprocess._write\n"
        "def _write(*args):\n"
        "    write(*args)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # mid-run: temporary files are written\n"
        "preprocess._write = _write\n"
        "sys.exit(preprocess.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", script, "--dataset", str(SAMPLE_TRAIN),
                        "--output-prefix", str(out / "x"), "--workers", "1", "--task-chars",
                        "10000", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=120)
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines() == ["error: terminated (SIGTERM); no output written"]
    assert list(out.iterdir()) == []


def test_a_rerun_removes_temporary_files_of_dead_runs(tmp_path, capsys):
    # SIGKILL (or a crash of the machine) leaves PREFIX.{bin,idx}.tmp-PID, GBs on a full corpus.
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # its pid now names no process
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "Hello world"}])
    stale = [tmp_path / f"x_text_document.{e}.tmp-{dead.pid}" for e in ("bin", "idx")]
    alive = tmp_path / f"x_text_document.bin.tmp-{os.getppid()}"  # a run still writing
    for overwrite in ([], ["--overwrite"]):
        for path in stale + [alive]:
            path.write_bytes(b"partial")
        code, err = run(capsys, "--dataset", src, "--output-prefix", tmp_path / "x", *overwrite)
        assert code == 0, err
        assert not any(p.exists() for p in stale) and alive.exists()
        assert f"removed {stale[0]} (left by process {dead.pid}, which has exited)" in err


def test_without_the_data_extra_hub_and_parquet_give_an_install_hint(tmp_path, capsys, monkeypatch):
    for module in ("datasets", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # `import datasets` raises ImportError
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    for dataset, needs in (("wikimedia/wikipedia", "hub dataset wikimedia/wikipedia needs datasets"),
                           (tmp_path / "a.parquet", "Parquet input needs pyarrow")):
        code, err = run(capsys, "--dataset", dataset, "--output-prefix", tmp_path / "x",
                        "--workers", 0)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1, err
        assert lines[0].startswith(f"error: {needs}, which is not installed"), err
        assert lines[0].endswith(f"pip install -e '.[data]' (or pip install {needs.split()[-1]})")
    assert list(tmp_path.iterdir()) == [tmp_path / "a.parquet"]


@pytest.mark.parametrize("step", ["add_document", "finalize"])
def test_a_full_disk_ends_in_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, step):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(IndexedDatasetBuilder, step, full)
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(capsys, "--dataset", SAMPLE_VALID, "--output-prefix", out / "x", "--quiet",
                    "--workers", 0)
    assert code == 1
    assert err.strip().splitlines() == [
        "error: cannot write output: OSError: [Errno 28] No space left on device"]
    assert list(out.iterdir()) == []


def test_docs_commands_make_the_prefixes_the_paper_configs_read():
    import re
    import shlex

    from megatron_bigmac.data.preprocess import output_prefixes
    from megatron_bigmac.training.config import read_yaml

    made = set()
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "data.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "-m megatron_bigmac.data.preprocess" in line:
                argv = shlex.split(line.split("data.preprocess", 1)[1], comments=True)
                args = build_parser().parse_args(argv)
                made.update(output_prefixes(args.output_prefix, args.json_key,
                                            args.split_validation).values())
    for config in sorted((REPO / "configs" / "paper").glob("gpt3_*.yaml")):
        keys = read_yaml(config)
        for key in ("data_path", "train_data_path", "valid_data_path"):
            for prefix in keys.get(key, []):
                assert prefix in made, (config.name, key, prefix, sorted(made))

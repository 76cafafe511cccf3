"""GPT-2 byte-level BPE tokenizer that plugs into megatron-core's tokenizer interface.

The paper's models use the GPT-2 BPE (50,257 tokens, ``<|endoftext|>`` = 50256). Its two files,
``vocab.json`` (OpenAI ``encoder.json``) and ``merges.txt`` (OpenAI ``vocab.bpe``), ship with the
package under ``megatron_bigmac/assets/gpt2`` (MIT), so nothing is downloaded.

Two interchangeable backends produce identical ids:

* ``tiktoken`` (fast path): an ``Encoding`` built from the two local files;
* ``tokenizers`` (Hugging Face, fallback): ``BPE.from_file`` with the ByteLevel pre-tokenizer.

Whichever is used, it is checked once at construction against ids known to be right (see
``_PROBES``), so a broken or mismatched backend fails loudly instead of writing wrong data.

``GPT2BPETokenizer`` subclasses megatron-core's ``MegatronTokenizerText`` (what
``megatron.core.tokenizers.MegatronTokenizer.from_pretrained`` returns), so the trainer, the data
pipeline and megatron-core's ``GPTDataset`` all see one object with ``.tokenize``,
``.detokenize``, ``.vocab_size``, ``.eod`` and ``.unique_identifiers``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron.core.tokenizers.text.libraries.abstract_tokenizer import (
    MegatronTokenizerTextAbstract,
)
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
EOD_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_EOD_ID = 50256
#: GPT-2's vocab padded to a multiple of 128, as Megatron does for the embedding table.
GPT2_PADDED_VOCAB_SIZE = 50304

#: The copy of the GPT-2 files shipped inside the package.
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "gpt2"

BACKENDS = ("auto", "tiktoken", "tokenizers")

# GPT-2's pre-tokenization regex (tiktoken's ``r50k_base``/``gpt2`` pattern).
_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# Known-good (text, ids) pairs for the GPT-2 files: contractions, digits, multi-byte UTF-8,
# runs of spaces, newlines and a literal end-of-text marker (which is ordinary text in a document).
_PROBES: Tuple[Tuple[str, Tuple[int, ...]], ...] = (
    ("Hello world", (15496, 995)),
    (
        "It's 2015 — naïve café 東京 \n\n  spaces   end <|endoftext|>  ",
        (1026, 338, 1853, 851, 41492, 40304, 10545, 251, 109, 12859, 105, 220, 628, 220, 9029,
         220, 220, 886, 1279, 91, 437, 1659, 5239, 91, 29, 220, 220),
    ),
)


class TokenizerFilesError(ValueError):
    """The tokenizer directory is missing or does not hold a usable GPT-2 style BPE."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    vocab.json and merges.txt spell every token in these characters rather than raw bytes.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def tokenizer_files(tokenizer_dir: Optional[str | Path] = None) -> Tuple[Path, Path]:
    """Paths of (vocab.json, merges.txt) in ``tokenizer_dir``; raise if either is missing."""
    directory = Path(tokenizer_dir) if tokenizer_dir is not None else DEFAULT_TOKENIZER_DIR
    if not directory.is_dir():
        raise TokenizerFilesError(f"tokenizer directory {str(directory)!r} does not exist")
    vocab, merges = directory / VOCAB_FILE, directory / MERGES_FILE
    missing = [p.name for p in (vocab, merges) if not p.is_file()]
    if missing:
        raise TokenizerFilesError(
            f"tokenizer directory {str(directory)!r} lacks {' and '.join(missing)} "
            f"(a GPT-2 BPE needs {VOCAB_FILE} and {MERGES_FILE})"
        )
    return vocab, merges


def _load_vocab(vocab_path: Path) -> Dict[str, int]:
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFilesError(f"cannot read {vocab_path}: {e}") from None
    if not isinstance(vocab, dict) or EOD_TOKEN not in vocab:
        raise TokenizerFilesError(f"{vocab_path} is not a GPT-2 vocab (no {EOD_TOKEN} entry)")
    return vocab


def _load_merges(merges_path: Path) -> List[Tuple[str, str]]:
    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFilesError(f"cannot read {merges_path}: {e}") from None
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if not merges or any(len(m) != 2 for m in merges):
        raise TokenizerFilesError(f"{merges_path} is not a BPE merges file (pairs per line)")
    return merges


def _mergeable_ranks(vocab: Dict[str, int], merges: List[Tuple[str, str]]) -> Dict[bytes, int]:
    """tiktoken's ``mergeable_ranks`` (token bytes -> id) from the GPT-2 files.

    tiktoken merges by rank, so this is only valid when the id of every merge result is
    256 + its line in merges.txt (true for GPT-2). Checked here; raise otherwise.
    """
    byte_of = {char: b for b, char in bytes_to_unicode().items()}
    ranks = {
        bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token != EOD_TOKEN
    }
    singles = sorted(i for tok, i in ranks.items() if len(tok) == 1)
    consistent = singles == list(range(256)) and all(
        vocab.get(a + b) == 256 + line for line, (a, b) in enumerate(merges)
    )
    if not consistent or len(ranks) != 256 + len(merges):
        raise TokenizerFilesError("vocab.json and merges.txt do not agree on merge order")
    return ranks


@dataclass(frozen=True)
class _Backend:
    """One encoding library behind ``GPT2BPELibrary``; all of them give identical ids."""

    name: str
    encode_batch: Callable[[Sequence[str]], List[List[int]]]
    encode_arrays: Callable[[Sequence[str]], List[np.ndarray]]
    decode: Callable[[Sequence[int]], str]


class GPT2BPELibrary(MegatronTokenizerTextAbstract):
    """Library layer (like megatron-core's ``TikTokenTokenizer``): GPT-2 BPE on one backend.

    Args:
        tokenizer_dir: directory with vocab.json and merges.txt; None for the shipped copy.
        backend: "tiktoken", "tokenizers", or "auto" (tiktoken if importable, else tokenizers).
    """

    def __init__(self, tokenizer_dir: Optional[str | Path] = None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        vocab_path, merges_path = tokenizer_files(tokenizer_dir)
        self.tokenizer_dir = vocab_path.parent
        self.encoder = _load_vocab(vocab_path)
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self._eod_id = self.encoder[EOD_TOKEN]
        merges = _load_merges(merges_path)

        if backend in ("auto", "tiktoken"):
            try:
                self._backend = self._tiktoken_backend(merges)
            except ImportError:
                if backend == "tiktoken":
                    raise
                logger.warning("tiktoken is not installed: using the slower HF tokenizers backend")
                backend = "tokenizers"
        if backend == "tokenizers":
            self._backend = self._hf_backend(vocab_path, merges_path)
        self.backend = self._backend.name
        self._check_probes()

    def _tiktoken_backend(self, merges) -> _Backend:
        import tiktoken

        encoding = tiktoken.Encoding(
            name=f"gpt2-bpe:{self.tokenizer_dir}",
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=_mergeable_ranks(self.encoder, merges),
            special_tokens={EOD_TOKEN: self._eod_id},
            explicit_n_vocab=len(self.encoder),
        )

        # A literal "<|endoftext|>" inside a document is plain text: encode_ordinary, and no
        # special token allowed (nor refused) in encode_to_numpy.
        def encode_batch(texts: Sequence[str]) -> List[List[int]]:
            return [encoding.encode_ordinary(t) for t in texts]

        def encode_arrays(texts: Sequence[str]) -> List[np.ndarray]:
            # ~1.5x faster than encode_ordinary: no Python int per token.
            return [encoding.encode_to_numpy(t, disallowed_special=()) for t in texts]

        def decode(ids: Sequence[int]) -> str:
            return encoding.decode(list(ids), errors="replace")

        return _Backend("tiktoken", encode_batch, encode_arrays, decode)

    def _hf_backend(self, vocab_path: Path, merges_path: Path) -> _Backend:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()

        def encode_batch(texts: Sequence[str]) -> List[List[int]]:
            return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

        def encode_arrays(texts: Sequence[str]) -> List[np.ndarray]:
            return [np.asarray(ids, dtype=np.uint32) for ids in encode_batch(texts)]

        def decode(ids: Sequence[int]) -> str:
            return tok.decode(list(ids), skip_special_tokens=False)

        return _Backend("tokenizers", encode_batch, encode_arrays, decode)

    def _check_probes(self) -> None:
        """Refuse a backend whose ids differ from the reference ids of the GPT-2 files."""
        if len(self.encoder) != GPT2_VOCAB_SIZE:
            return  # a different byte-level BPE: the probes only hold for GPT-2's own files
        for text, expected in _PROBES:
            got = tuple(self.text_to_ids(text))
            if got != expected:
                raise RuntimeError(
                    f"{self.backend} backend encodes {text!r} as {list(got)}, expected "
                    f"{list(expected)}: this backend/version does not reproduce GPT-2 BPE"
                )

    # -- MegatronTokenizerTextAbstract

    def text_to_ids(self, text: str) -> List[int]:
        return self._backend.encode_batch([text])[0]

    def batch_text_to_ids(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode many documents in one call (no end-of-document token appended)."""
        return self._backend.encode_batch(texts)

    def batch_text_to_arrays(self, texts: Sequence[str]) -> List[np.ndarray]:
        """``batch_text_to_ids`` as uint32 arrays: the fast path for bulk preprocessing."""
        return self._backend.encode_arrays(texts)

    def ids_to_text(self, ids: Sequence[int]) -> str:
        return self._backend.decode(ids)

    def text_to_tokens(self, text: str) -> List[str]:
        return self.ids_to_tokens(self.text_to_ids(text))

    def tokens_to_text(self, tokens: Sequence[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def tokens_to_ids(self, tokens: Sequence[str]) -> List[int]:
        return [self.encoder[t] for t in tokens]

    def ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.decoder[int(i)] for i in ids]

    def add_special_tokens(self, special_tokens=None):
        raise NotImplementedError("the GPT-2 BPE vocabulary is fixed")

    # GPT-2 has one special token; like Hugging Face's GPT-2 tokenizer, it is bos, eos and eod.
    # Defining these here also stops the abstract base's self-referencing property fallbacks.
    @property
    def eod(self) -> int:
        return self._eod_id

    @property
    def eos_id(self) -> int:
        return self._eod_id

    @property
    def bos_id(self) -> int:
        return self._eod_id

    def _no_such_token(name: str):  # noqa: N805 (helper used at class-creation time)
        def missing(self):
            # AttributeError, so megatron-core's GPTDataset falls back to its own pad id (-1).
            raise AttributeError(f"the GPT-2 BPE has no {name} token")

        return property(missing)

    pad_id = _no_such_token("pad")
    unk_id = _no_such_token("unk")
    mask_id = _no_such_token("mask")
    cls_id = _no_such_token("cls")
    sep_id = _no_such_token("sep")
    del _no_such_token

    @property
    def additional_special_tokens_ids(self) -> list:
        return []

    @property
    def vocab(self) -> Dict[str, int]:
        return self.encoder

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self.decoder

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)


class GPT2BPETokenizer(MegatronTokenizerText):
    """megatron-core text tokenizer (``model_type`` "gpt") backed by ``GPT2BPELibrary``.

    Build it with ``build_tokenizer``. ``tokenize`` returns ids without an end-of-document token;
    the data pipeline appends ``eod`` itself.
    """

    LIBRARY = "gpt2-bpe"

    def __init__(self, path: Optional[str | Path] = None, backend: str = "auto", **kwargs):
        path = str(Path(path) if path is not None else DEFAULT_TOKENIZER_DIR)
        config = {"library": self.LIBRARY, "model_type": "gpt", "chat_template": None}
        config["class_name"], config["class_path"] = type(self).__name__, type(self).__module__
        self._backend_request = backend
        # Recorded like Megatron-LM's GPT2BPETokenizer arguments: they feed `.vocab_file`,
        # `.merges_file` and `unique_identifiers` (which keys megatron-core's dataset caches).
        # The backend is left out on purpose: both give identical ids.
        kwargs.setdefault("vocab_file", str(Path(path) / VOCAB_FILE))
        kwargs.setdefault("merges_file", str(Path(path) / MERGES_FILE))
        super().__init__(path, config, **kwargs)

    def _restore_model(self, **kwargs) -> GPT2BPELibrary:
        # megatron-core maps `library` to its own classes; ours is not among them.
        return GPT2BPELibrary(self.path, backend=self._backend_request)

    @property
    def backend(self) -> str:
        """Which library does the encoding: "tiktoken" or "tokenizers"."""
        return self._tokenizer.backend

    @property
    def tokenizer_dir(self) -> Path:
        return self._tokenizer.tokenizer_dir

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode many documents; no end-of-document token is appended."""
        return self._tokenizer.batch_text_to_ids(texts)

    def tokenize_to_arrays(self, texts: Sequence[str]) -> List[np.ndarray]:
        """``tokenize_batch`` as uint32 arrays (the preprocessing workers' fast path)."""
        return self._tokenizer.batch_text_to_arrays(texts)


def tokenizer_vocab_size(tokenizer_dir: Optional[str | Path] = None) -> int:
    """``vocab_size`` of ``build_tokenizer(tokenizer_dir)``, from its vocab.json alone (no backend
    built). Raises ``TokenizerFilesError`` like ``build_tokenizer``."""
    if tokenizer_dir is None:
        return GPT2_VOCAB_SIZE  # the shipped copy of GPT-2's files
    return len(_load_vocab(tokenizer_files(tokenizer_dir)[0]))


def build_tokenizer(tokenizer_dir: Optional[str | Path] = None, backend: str = "auto"):
    """The GPT-2 BPE tokenizer from ``tokenizer_dir`` (default: the copy shipped in the package).

    Raises ``TokenizerFilesError`` when the directory or either file is missing or unusable.
    """
    return GPT2BPETokenizer(tokenizer_dir, backend=backend)

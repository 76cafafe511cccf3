"""Data: GPT-2 BPE tokenizer and corpus -> megatron-core indexed dataset preprocessing.

``python -m megatron_bigmac.data.preprocess --help`` turns Hugging Face hub datasets or local
JSONL/Parquet files into the ``.bin``/``.idx`` pairs that megatron-core's ``GPTDataset`` reads.
"""

from megatron_bigmac.data.tokenizer import (
    DEFAULT_TOKENIZER_DIR,
    GPT2_EOD_ID,
    GPT2_PADDED_VOCAB_SIZE,
    GPT2_VOCAB_SIZE,
    GPT2BPETokenizer,
    build_tokenizer,
)

__all__ = [
    "DEFAULT_TOKENIZER_DIR",
    "GPT2_EOD_ID",
    "GPT2_PADDED_VOCAB_SIZE",
    "GPT2_VOCAB_SIZE",
    "GPT2BPETokenizer",
    "build_tokenizer",
]

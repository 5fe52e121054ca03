"""Corpora, tokenizers and tokenised datasets.

``prepare_data`` is the one-call entry point used by training: load a corpus, build (or load the cached)
tokenizer, tokenise into cached memory-mapped files and return a :class:`TokenData` that samples batches.
"""

from condformer.data.corpus import Corpus, Document, load_corpus
from condformer.data.dataset import TokenData, prepare_data
from condformer.data.hf_tokenizer import HFTokenizer
from condformer.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    default_cache_dir,
    tokenizer_from_dict,
)

__all__ = [
    "Document",
    "Corpus",
    "load_corpus",
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "tokenizer_from_dict",
    "TokenData",
    "prepare_data",
    "default_cache_dir",
]

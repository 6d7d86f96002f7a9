"""Data layer: document sources, tokenizers, packed resumable datasets (see docs/data.md)."""

from .corpus import (
    DOCUMENT_SOURCES,
    SPLITS,
    Documents,
    get_documents,
    split_of_key,
    stdlib_documents,
    stdlib_root,
    text_documents,
)
from .dataset import (
    SAMPLE_KEYS,
    MixtureDataset,
    PackedTokenDataset,
    StatefulBatchLoader,
    build_dataloader,
)
from .tokenizer import (
    DEFAULT_TOKENIZER_PATH,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "DEFAULT_TOKENIZER_PATH",
    "DOCUMENT_SOURCES",
    "SAMPLE_KEYS",
    "SPLITS",
    "Documents",
    "HuggingFaceTokenizer",
    "MixtureDataset",
    "PackedTokenDataset",
    "SentencePieceTokenizer",
    "StatefulBatchLoader",
    "Tokenizer",
    "build_dataloader",
    "build_tokenizer",
    "get_documents",
    "split_of_key",
    "stdlib_documents",
    "stdlib_root",
    "text_documents",
]

"""Training and evaluation text: corpora (stdlib, Hub datasets, local files), tokenizers, and the Lightning data module
that cuts them into token blocks."""

from surgery.data.corpus import Corpus, load_documents
from surgery.data.datamodule import TokenBlocks, TooFewTokens
from surgery.data.tokenizer import get_tokenizer

__all__ = ["Corpus", "TokenBlocks", "TooFewTokens", "get_tokenizer", "load_documents"]

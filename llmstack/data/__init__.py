"""Training data: the default corpus (`packed`: stdlib sources, tokenizers, the packed resumable
loader) or local files through `datasets` (`hf`, `data.source: hf`). `build_data` picks the source;
the names below are the package's public surface (`from llmstack.data import Tokenizer`)."""
from __future__ import annotations

from llmstack.config import Config
from llmstack.data.hf import build_hf_data
from llmstack.data.packed import (EOT, Batch, DataBundle, DataError, PackedLoader, Tokenizer, build_corpus,
                                  build_stdlib_data, corpus_dir, doc_layout, eval_batches, is_val, open_split,
                                  read_meta, stdlib_files, token_file, train_bpe)

__all__ = ["EOT", "Batch", "DataBundle", "DataError", "PackedLoader", "Tokenizer", "build_corpus", "build_data",
           "corpus_dir", "doc_layout", "eval_batches", "is_val", "open_split", "read_meta", "stdlib_files",
           "token_file", "train_bpe"]


def build_data(cfg: Config, rank: int = 0, world: int = 1) -> DataBundle:
    """Train and val loaders (and the tokenizer) of the configured source."""
    if cfg.data.source == "hf":
        return build_hf_data(cfg, rank, world)
    return build_stdlib_data(cfg, rank, world)

"""The default corpus, tokenizers and the packed, resumable loader.

The default corpus is the Python standard library of the running interpreter (every `.py` under
`sysconfig.get_paths()['stdlib']`, tests and site-packages left out): real text on every machine,
so nothing is downloaded. Files go to train or val by a hash of their relative path, so the split
is the same on every machine with the same Python. Documents are joined with an end-of-text token
and stored as one flat uint16/uint32 memmap per split, beside `tokenizer.json` and `meta.json`.
"""
from __future__ import annotations

from llmstack import jsonio
from llmstack.errors import UserError

import hashlib
import json
import logging
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llmstack.config import Config, ConfigError, DataConfig

log = logging.getLogger("llmstack")
EOT = "<|endoftext|>"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


class DataError(UserError):
    """Bad data input; the message is one line naming the file or setting."""


# --- tokenizers ------------------------------------------------------------------------------

class Tokenizer:
    """encode/decode over three kinds: trained byte-level BPE, raw bytes, or an HF tokenizer folder."""

    def __init__(self, kind: str, path: Path | None = None):
        self.kind = kind
        self.path = path
        if kind == "bytes":
            self.vocab_size, self.eot_id = 257, 256
        elif kind == "bpe":
            from tokenizers import Tokenizer as HFTok  # tokenizers: only for the BPE tokenizer
            self._tok = HFTok.from_file(str(path))
            self.vocab_size = self._tok.get_vocab_size()
            self.eot_id = self._tok.token_to_id(EOT)
        elif kind == "hf":
            from transformers import AutoTokenizer  # transformers: seconds to import, only HF tokenizers need it
            self._tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            self.vocab_size = len(self._tok)
            self.eot_id = self._tok.eos_token_id
        else:
            raise DataError(f"data.tokenizer: got {kind!r}, allowed: bpe, bytes, hf")

    def encode(self, text: str) -> list[int]:
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        if self.kind == "bpe":
            return self._tok.encode(text).ids
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "bpe":
            return [e.ids for e in self._tok.encode_batch(texts)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, folder: Path) -> None:
        """Copy what is needed to rebuild this tokenizer into `folder` (a checkpoint)."""
        folder.mkdir(parents=True, exist_ok=True)
        info = {"kind": self.kind}
        if self.kind == "bpe":
            self._tok.save(str(folder / "tokenizer.json"))
        elif self.kind == "hf":
            self._tok.save_pretrained(str(folder / "hf_tokenizer"))
        (folder / "tokenizer_info.json").write_text(jsonio.dumps(info))

    @staticmethod
    def load(folder: Path) -> "Tokenizer":
        info_file = folder / "tokenizer_info.json"
        kind = json.loads(info_file.read_text())["kind"] if info_file.exists() else (
            "bpe" if (folder / "tokenizer.json").exists() else "bytes")
        if kind == "bpe":
            return Tokenizer("bpe", folder / "tokenizer.json")
        if kind == "hf":
            return Tokenizer("hf", folder / "hf_tokenizer")
        return Tokenizer("bytes")


def train_bpe(texts: list[str], vocab_size: int, out_file: Path) -> None:
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_file))


# --- the default corpus ----------------------------------------------------------------------

def corpus_dir(dcfg: DataConfig, vocab_size: int) -> Path:
    suffix = "bytes" if dcfg.tokenizer == "bytes" else f"{dcfg.tokenizer}{vocab_size}"
    if dcfg.max_files:
        suffix += f"-max{dcfg.max_files}"
    return Path(dcfg.dir) / suffix


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath) / name)
    return files


def is_val(relpath: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def read_texts(files: list[Path], root: Path) -> tuple[list[tuple[str, str]], dict]:
    """(relpath, text) of every readable UTF-8 non-empty file; bad files are counted, not fatal."""
    docs, skipped = [], {"empty": 0, "not_utf8": 0, "unreadable": 0}
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError:
            skipped["unreadable"] += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["not_utf8"] += 1
            continue
        if not text.strip():
            skipped["empty"] += 1
            continue
        docs.append((f.relative_to(root).as_posix(), text))
    return docs, skipped


def build_corpus(cfg: Config, source_root: Path | None = None, force: bool = False) -> Path:
    """Tokenize the stdlib corpus into `corpus_dir` (idempotent unless force)."""
    dcfg = cfg.data
    out = corpus_dir(dcfg, cfg.model.vocab_size)
    if (out / "meta.json").exists() and not force:
        return out
    root = Path(source_root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if dcfg.max_files:
        files = files[: dcfg.max_files]
    docs, skipped = read_texts(files, root)
    if not docs:
        raise DataError(f"no readable UTF-8 .py files under {root} ({sum(skipped.values())} skipped)")
    train_docs = [t for p, t in docs if not is_val(p, dcfg.val_fraction)]
    val_docs = [t for p, t in docs if is_val(p, dcfg.val_fraction)]
    if not val_docs:  # tiny corpora: keep at least one validation document
        val_docs = [train_docs.pop()]
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    if dcfg.tokenizer == "bpe":
        train_bpe(train_docs, cfg.model.vocab_size, tmp / "tokenizer.json")
        tok = Tokenizer("bpe", tmp / "tokenizer.json")
    elif dcfg.tokenizer == "bytes":
        tok = Tokenizer("bytes")
    else:
        raise DataError("data.tokenizer=hf goes with data.source=hf; the stdlib corpus uses bpe or bytes")
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    counts = {}
    for split, texts in (("train", train_docs), ("val", val_docs)):
        ids: list[int] = []
        for enc in tok.encode_batch(texts):
            ids.extend(enc)
            ids.append(tok.eot_id)
        np.asarray(ids, dtype=dtype).tofile(tmp / f"{split}.bin")
        counts[split] = len(ids)
    meta = {"source": "stdlib", "root": str(root), "tokenizer": dcfg.tokenizer, "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id, "dtype": np.dtype(dtype).name, "files": len(docs), "skipped": skipped,
            "train_docs": len(train_docs), "val_docs": len(val_docs),
            "train_tokens": counts["train"], "val_tokens": counts["val"]}
    (tmp / "meta.json").write_text(jsonio.dumps(meta, indent=2))
    if out.exists():
            shutil.rmtree(out)
    tmp.rename(out)
    log.info("built corpus %s: %d files (%s skipped), %d train / %d val tokens", out, len(docs),
             sum(skipped.values()), counts["train"], counts["val"])
    return out


# --- packed loading ----------------------------------------------------------------------------

def doc_layout(x: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids and per-document positions of packed windows x [B, T]; an end-of-text token
    belongs to the document it ends."""
    is_eot = (x == eot_id).long()
    doc_ids = torch.cumsum(is_eot, dim=1) - is_eot
    t = torch.arange(x.shape[1], device=x.device).expand_as(x)
    starts = torch.where(torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1), t, 0)
    position_ids = t - torch.cummax(starts, dim=1).values
    return doc_ids, position_ids


@dataclass
class Batch:
    input: torch.Tensor
    target: torch.Tensor
    doc_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        device = torch.device(device)
        pin = device.type == "cuda"  # pinned host memory lets the copy overlap the previous step

        def mv(t):
            if t is None:
                return None
            return (t.pin_memory() if pin else t).to(device, non_blocking=True)
        return Batch(mv(self.input), mv(self.target), mv(self.doc_ids), mv(self.position_ids))

    @property
    def n_targets(self) -> int:
        return int((self.target != -100).sum())


class PackedLoader:
    """Windows of seq_len+1 tokens cut from a flat token array, shuffled per epoch under a seed.

    The position is (epoch, cursor) over the global stream of windows; each data-parallel rank
    takes its own slice of every global micro-batch, so resuming restores the exact order.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, seed: int, eot_id: int,
                 doc_masking: bool = False, rank: int = 0, world: int = 1, shuffle: bool = True, name: str = "train"):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.eot_id, self.doc_masking = seed, eot_id, doc_masking
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size * world:
            raise DataError(f"data.seq_len: {seq_len} x batch {batch_size * world} needs more tokens than the "
                            f"{name} split has ({len(tokens)}); lower data.seq_len or train.micro_batch_size")
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_windows)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_windows, generator=g)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order()

    def window_batch(self, idx: torch.Tensor) -> Batch:
        starts = idx.numpy().astype(np.int64) * self.seq_len
        rows = np.stack([self.tokens[s: s + self.seq_len + 1] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)
        x, y = data[:, :-1], data[:, 1:].clone()
        if not self.doc_masking:
            return Batch(x, y)
        doc_ids, pos = doc_layout(x, self.eot_id)
        return Batch(x, y, doc_ids, pos)

    def next_batch(self) -> Batch:
        step = self.batch_size * self.world
        if self.cursor + step > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._make_order()
        lo = self.cursor + self.rank * self.batch_size
        batch = self.window_batch(self._order[lo: lo + self.batch_size])
        self.cursor += step
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    @property
    def tokens_per_epoch(self) -> int:
        return self.n_windows * self.seq_len


def eval_batches(loader: PackedLoader, n_batches: int) -> list[Batch]:
    """A fixed set of validation batches spread evenly over the split (same every eval)."""
    total = min(loader.n_windows // loader.batch_size, n_batches)
    stride = max(1, loader.n_windows // (total * loader.batch_size))
    out = []
    for b in range(total):
        idx = torch.arange(b * loader.batch_size, (b + 1) * loader.batch_size) * stride
        out.append(loader.window_batch(idx.clamp(max=loader.n_windows - 1)))
    return out


def read_meta(folder: Path, *, needs: tuple[str, ...] = ()) -> dict:
    """A corpus folder's meta.json, or one line saying it is missing, unreadable or incomplete."""
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        raise DataError(f"{folder}: no meta.json; build it with `llmstack data build`")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{meta_file}: not valid JSON; rebuild with `llmstack data build --force`") from None
    missing = [k for k in needs if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{meta_file}: missing {missing[0]}; rebuild with `llmstack data build --force`")
    return meta


def open_split(folder: Path, split: str) -> tuple[np.ndarray, dict]:
    meta = read_meta(folder, needs=("dtype", "vocab_size", "eot_id"))
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{folder / 'meta.json'}: dtype {meta['dtype']!r}, allowed uint16, uint32")
    path = folder / f"{split}.bin"
    if not path.exists():
        raise DataError(f"{path}: missing split file; rebuild with `llmstack data build --force`")
    return token_file(path, np.dtype(meta["dtype"]), meta["vocab_size"]), meta


def token_file(path: Path, dtype: np.dtype, vocab_size: int | None = None) -> np.ndarray:
    """A flat token file as a read-only memmap; empty, torn (odd-sized) or out-of-vocabulary files
    are one line naming the file."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty token file; rebuild the corpus")
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (truncated?); rebuild the corpus")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: token id {int(tokens.max())} >= vocab size {vocab_size}")
    return tokens


@dataclass
class DataBundle:
    train: PackedLoader
    val: PackedLoader
    tokenizer: Tokenizer
    meta: dict


def build_stdlib_data(cfg: Config, rank: int = 0, world: int = 1) -> DataBundle:
    """Loaders for the default corpus; builds it on first use (rank 0 builds, the others wait for
    it when a process group exists)."""
    folder = corpus_dir(cfg.data, cfg.model.vocab_size)
    if rank == 0:
        build_corpus(cfg)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    train_tokens, meta = open_split(folder, "train")
    val_tokens, _ = open_split(folder, "val")
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} < tokenizer vocab {meta['vocab_size']} of {folder}")
    tok = Tokenizer.load(folder)
    common = dict(seed=cfg.train.seed, eot_id=meta["eot_id"], doc_masking=cfg.data.doc_masking, rank=rank, world=world)
    train = PackedLoader(train_tokens, cfg.data.seq_len, cfg.train.micro_batch_size, name="train", **common)
    val = PackedLoader(val_tokens, cfg.data.seq_len, cfg.train.micro_batch_size, shuffle=False, name="val", **common)
    return DataBundle(train, val, tok, meta)

"""`data.source: hf`: local files or a saved dataset folder, read through `datasets`, tokenized with
an HF tokenizer folder, packed into seq_len windows that keep document boundaries.

Inputs (`data.paths`): .json/.jsonl, .txt, .parquet or .csv files (one kind per run), or folders
written by `Dataset.save_to_disk` (their `validation`/`test` split, if any, is the held-out split).
Nothing is downloaded. Formats:
- `text`: each record's `data.text_field` is one document, ending with the tokenizer's eos;
- `chat`: each record's `messages` ({role, content} list) is rendered with the tokenizer's chat
  template and only tokens of assistant turns are targets (-100 elsewhere).

The tokenized corpus is three flat arrays per split (token ids, a target flag per token, a document
index per token), cached under `<data.dir>/hf_cache/<key>` where the key hashes the input files
(path, size, mtime), the tokenizer files and every setting that changes the tokens; a rebuilt key
means a new folder, never a stale cache. Without a held-out split, documents go to validation by
a hash of their content (`data.val_split_fraction`), so the split does not depend on file order.
`data.streaming: true` reads records lazily (bounded memory for large corpora) and writes the cache
chunk by chunk in one process; otherwise `datasets.map` tokenizes with `data.num_proc` processes.

A target never crosses a document boundary: the last token of a document does not predict the next
document's first token. With `data.doc_masking`, batches carry doc_ids and per-document position_ids
(positions restart at each window start, like `packed.doc_layout`). Loaders are `PackedLoader`s, so
data-parallel sharding and exact resume (epoch, cursor) work as for the default corpus; the cache key
is part of the resume state, and resuming against a different corpus is an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from llmstack.config import Config, ConfigError
from llmstack.data.packed import Batch, DataBundle, DataError, PackedLoader, Tokenizer, is_val, read_meta, token_file

log = logging.getLogger("llmstack")
CACHE_VERSION = 2  # 2: a saved held-out split no longer receives train documents by hash
_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".parquet": "parquet", ".csv": "csv"}
_VAL_SPLITS = ("validation", "val", "test")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja", "added_tokens.json")
_CHUNK = 1000


# --- the cache key -----------------------------------------------------------------------------

def _file_fingerprints(paths: list[str]) -> list:
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise DataError(f"data.paths: {p}: no such file or folder")
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _tokenizer_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()


def cache_key(cfg: Config) -> str:
    d = cfg.data
    spec = {"v": CACHE_VERSION, "files": _file_fingerprints(d.paths), "tokenizer": _tokenizer_fingerprint(Path(d.tokenizer_path)),
            "format": d.format, "text_field": d.text_field, "val": d.val_split_fraction}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --- reading records ---------------------------------------------------------------------------

def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def load_records(cfg: Config, cache_root: Path):
    """(train records, held-out records or None) as datasets (Iterable when streaming)."""
    import datasets  # datasets: only for data.source=hf
    d = cfg.data
    paths = [Path(p) for p in d.paths]
    saved = [p for p in paths if _is_saved_dataset(p)]
    if saved:
        if len(paths) != 1:
            raise DataError(f"data.paths: a saved dataset folder ({saved[0]}) must be the only entry")
        ds = datasets.load_from_disk(str(saved[0]))
        val = None
        if isinstance(ds, datasets.DatasetDict):
            val = next((ds[s] for s in _VAL_SPLITS if s in ds), None)
            if "train" not in ds:
                raise DataError(f"data.paths: {saved[0]} has splits {list(ds)}, needs a 'train' split")
            ds = ds["train"]
        if d.streaming:
            ds = ds.to_iterable_dataset()
            val = val.to_iterable_dataset() if val is not None else None
        return ds, val
    files: list[str] = []
    for p in paths:
        if p.is_dir():
            files += [str(f) for f in sorted(p.rglob("*")) if f.suffix in _BUILDERS]
        elif p.is_file():
            files.append(str(p))
        else:
            raise DataError(f"data.paths: {p}: no such file or folder")
    kinds = {_BUILDERS.get(Path(f).suffix) for f in files}
    if not files or None in kinds:
        bad = next((f for f in files if Path(f).suffix not in _BUILDERS), d.paths[0])
        raise DataError(f"data.paths: {bad}: not a supported file (allowed: {', '.join(sorted(_BUILDERS))}) "
                        f"or saved dataset folder")
    if len(kinds) > 1:
        raise DataError(f"data.paths: mixes file kinds {sorted(kinds)}; use one kind per run")
    # datasets logs a parse failure with its own traceback before raising; the one line below says it
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train", streaming=d.streaming,
                                   cache_dir=str(cache_root / "datasets"))
    except Exception as e:  # datasets raises many types for unparsable input
        raise DataError(f"data.paths: could not read {files[0] if len(files) == 1 else files}: "
                        f"{(str(e).splitlines() or [type(e).__name__])[0][:160]}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return ds, None


# --- tokenization ------------------------------------------------------------------------------

def _doc_key(record) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def chat_tokens(hf_tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a 1/0 flag per token: 1 inside assistant turns.

    Assistant spans are found by rendering prefixes of the conversation: the text added by
    message i beyond `render(messages[:i], add_generation_prompt=True)` is the assistant's."""
    def render(msgs, gen=False):
        return hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start, end = len(render(messages[:i], gen=True)) if i else 0, len(render(messages[: i + 1]))
        if not full.startswith(render(messages[: i + 1])):
            raise DataError("chat template: rendering is not prefix-stable, so assistant turns cannot be located")
        spans.append((start, end))
    enc = hf_tok(full, add_special_tokens=False, return_offsets_mapping=True)
    flags = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), flags


def make_tokenize_fn(tok_path: str, fmt: str, text_field: str, val_fraction: float, split_by_hash: bool):
    """A batched `map` function: records -> input_ids, flags, is_val (picklable for num_proc);
    is_val is the content hash's verdict with split_by_hash, else False."""
    state = {}

    def fn(batch):
        if "tok" not in state:
            from transformers import AutoTokenizer  # transformers: seconds to import, only HF tokenizers need it
            state["tok"] = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=False)
        tok = state["tok"]
        if tok.eos_token_id is None:
            raise DataError(f"data.tokenizer_path: {tok_path} has no eos token")
        n = len(next(iter(batch.values())))
        records = [{k: batch[k][i] for k in batch} for i in range(n)]
        ids, flags = [], []
        if fmt == "text":
            if text_field not in batch:
                raise DataError(f"data.text_field: no field {text_field!r} in the records (fields: {', '.join(batch)})")
            texts = [r[text_field] for r in records]
            bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
            if bad is not None:
                raise DataError(f"data.text_field: field {text_field!r} of a record is {type(texts[bad]).__name__} "
                                f"({str(texts[bad])[:40]!r}), expected a string")
            for enc in tok([t or "" for t in texts], add_special_tokens=True)["input_ids"]:
                enc = list(enc) + [tok.eos_token_id]
                ids.append(enc)
                flags.append([1] * len(enc))
        else:
            if "messages" not in batch:
                raise DataError(f"data.format=chat: records need a 'messages' field (fields: {', '.join(batch)})")
            for r in records:
                t, f = chat_tokens(tok, r["messages"])
                ids.append(t)
                flags.append(f)
        is_v = [is_val(_doc_key(r), val_fraction) for r in records] if split_by_hash else [False] * n
        return {"input_ids": ids, "flags": flags, "is_val": is_v}

    return fn


class _SplitWriter:
    def __init__(self, folder: Path, split: str):
        self.files = {k: open(folder / f"{split}.{k}.bin", "wb") for k in ("tokens", "flags", "docs")}
        self.tokens, self.docs, self.targets = 0, 0, 0

    def add(self, ids: list[int], flags: list[int]) -> None:
        if not ids:
            return
        self.files["tokens"].write(np.asarray(ids, dtype=np.uint32).tobytes())
        self.files["flags"].write(np.asarray(flags, dtype=np.uint8).tobytes())
        self.files["docs"].write(np.full(len(ids), self.docs, dtype=np.uint32).tobytes())
        self.tokens += len(ids)
        self.targets += sum(flags[1:])
        self.docs += 1

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def build_cache(cfg: Config, out: Path) -> dict:
    """Tokenize the configured records into `out` (atomic: a .tmp folder renamed when complete)."""
    d = cfg.data
    root = out.parent
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizer threads + fork (num_proc) deadlock
    ds, held_out = load_records(cfg, root)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {"train": _SplitWriter(tmp, "train"), "val": _SplitWriter(tmp, "val")}
        sources = [(ds, False)] + ([(held_out, True)] if held_out is not None else [])
        for source, is_held_out in sources:
            # a saved held-out split is the validation set as is: no train document moves to it
            fn = make_tokenize_fn(d.tokenizer_path, d.format, d.text_field, d.val_split_fraction,
                                  split_by_hash=held_out is None)
            cols = list(source.column_names or []) if not d.streaming else None
            if d.streaming:
                mapped = source.map(fn, batched=True, batch_size=_CHUNK, remove_columns=cols)
            else:
                mapped = source.map(fn, batched=True, batch_size=_CHUNK, remove_columns=cols, keep_in_memory=True,
                                    num_proc=d.num_proc if d.num_proc > 1 and len(source) >= d.num_proc else None,
                                    desc="tokenizing")
            for chunk in mapped.iter(batch_size=_CHUNK):
                for ids, flags, v in zip(chunk["input_ids"], chunk["flags"], chunk["is_val"]):
                    writers["val" if (is_held_out or v) else "train"].add(ids, flags)
        for w in writers.values():
            w.close()
        counts = {s: {"tokens": w.tokens, "docs": w.docs, "targets": w.targets} for s, w in writers.items()}
        for split, c in counts.items():
            if c["docs"] == 0:
                raise DataError(f"data.paths: no {split} documents (of {counts['train']['docs'] + counts['val']['docs']}); "
                                f"add data or change data.val_split_fraction")
            if c["targets"] == 0:
                raise DataError(f"data.paths: the {split} split has no target tokens (chat data without assistant turns?)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {"source": "hf", "paths": d.paths, "format": d.format, "tokenizer_path": d.tokenizer_path,
            **{f"{s}_{k}": v for s, c in counts.items() for k, v in c.items()}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("tokenized %s: %d/%d train/val docs, %d/%d tokens", d.paths, counts["train"]["docs"],
             counts["val"]["docs"], counts["train"]["tokens"], counts["val"]["tokens"])
    return meta


# --- loading -----------------------------------------------------------------------------------

class DocPackedLoader(PackedLoader):
    """PackedLoader over cached token/flag/doc arrays: targets only where the flag is set and the
    target token is in the same document; doc_ids/position_ids when doc masking is on."""

    def __init__(self, folder: Path, split: str, key: str, *args, **kwargs):
        self.flags = np.memmap(folder / f"{split}.flags.bin", dtype=np.uint8, mode="r")
        self.docs = np.memmap(folder / f"{split}.docs.bin", dtype=np.uint32, mode="r")
        self.key = key
        super().__init__(np.memmap(folder / f"{split}.tokens.bin", dtype=np.uint32, mode="r"), *args, **kwargs)

    def window_batch(self, idx: torch.Tensor) -> Batch:
        starts = idx.numpy().astype(np.int64) * self.seq_len
        span = lambda a: np.stack([a[s: s + self.seq_len + 1] for s in starts]).astype(np.int64)  # noqa: E731
        tok, flag, doc = (torch.from_numpy(span(a)) for a in (self.tokens, self.flags, self.docs))
        x = tok[:, :-1]
        keep = (flag[:, 1:] == 1) & (doc[:, 1:] == doc[:, :-1])
        y = torch.where(keep, tok[:, 1:], torch.full_like(x, -100))
        if not self.doc_masking:
            return Batch(x, y)
        d = doc[:, :-1]
        doc_ids = d - d[:, :1]
        t = torch.arange(self.seq_len).expand_as(x)
        new_doc = torch.cat([torch.ones_like(d[:, :1], dtype=torch.bool), d[:, 1:] != d[:, :-1]], 1)
        position_ids = t - torch.cummax(torch.where(new_doc, t, 0), dim=1).values
        return Batch(x, y, doc_ids, position_ids)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "cache_key": self.key}

    def load_state_dict(self, state: dict) -> None:
        if state.get("cache_key", self.key) != self.key:
            raise DataError(f"resume: the data changed since the checkpoint (cache key {state['cache_key']} -> {self.key}); "
                            f"resuming would not continue the same data order")
        super().load_state_dict(state)


def _check_config(cfg: Config) -> None:
    d = cfg.data
    if d.tokenizer != "hf" or not d.tokenizer_path:
        raise ConfigError("data.tokenizer: data.source=hf needs data.tokenizer=hf and data.tokenizer_path (a local folder)")
    if not Path(d.tokenizer_path).is_dir():
        raise DataError(f"data.tokenizer_path: {d.tokenizer_path}: no such tokenizer folder")
    if d.num_proc < 1:
        raise ConfigError(f"data.num_proc: got {d.num_proc}, must be >= 1")
    if not 0 < d.val_split_fraction < 1:
        raise ConfigError(f"data.val_split_fraction: got {d.val_split_fraction}, allowed (0, 1)")


def build_hf_data(cfg: Config, rank: int = 0, world: int = 1) -> DataBundle:
    _check_config(cfg)
    d = cfg.data
    tok = Tokenizer("hf", Path(d.tokenizer_path))
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} < tokenizer vocab {tok.vocab_size} of {d.tokenizer_path}")
    key = cache_key(cfg)
    folder = Path(d.dir) / "hf_cache" / key
    if rank == 0 and not (folder / "meta.json").exists():
        build_cache(cfg, folder)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    meta = {**read_meta(folder), "cache": str(folder), "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    for split in ("train", "val"):
        token_file(folder / f"{split}.tokens.bin", np.dtype(np.uint32))
    common = dict(seed=cfg.train.seed, eot_id=tok.eot_id, doc_masking=d.doc_masking, rank=rank, world=world)
    train = DocPackedLoader(folder, "train", key, d.seq_len, cfg.train.micro_batch_size, name="train", **common)
    val = DocPackedLoader(folder, "val", key, d.seq_len, cfg.train.micro_batch_size, shuffle=False, name="val", **common)
    return DataBundle(train, val, tok, meta)


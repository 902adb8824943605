"""data.source=hf: SFT loss masking on a hand-made conversation, document boundaries in packed
windows, cache keys, exact resume, data-parallel sharding, num_proc/streaming equivalence, errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmstack.config import CONFIGS_DIR, load_config
from llmstack.data import DataError, doc_layout
from tests.helpers import ROOT, TEST_DATA_DIR


def example_dir() -> Path:
    """scripts/make_example_data.py output, built once per version of the script and shared by
    test runs (a per-process temporary folder renamed into place, so concurrent runs are safe)."""
    script = ROOT / "scripts" / "make_example_data.py"
    key = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    final = TEST_DATA_DIR.parent / f"hf_examples_{key}"
    if not (final / "tiny-llama" / "config.json").exists():
        from scripts.make_example_data import make_example_data
        tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make_example_data(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another run won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def hf_cfg(tmp_path: Path, paths, **extra):
    ex = example_dir()
    over = {"data.source": "hf", "data.tokenizer": "hf", "data.tokenizer_path": str(ex / "tiny-llama"),
            "data.paths": json.dumps([str(p) for p in paths]), "data.dir": str(tmp_path / "cache"),
            "data.seq_len": 32, "data.doc_masking": True, "model.vocab_size": 384, "model.max_seq_len": 64,
            "train.micro_batch_size": 2, "logging.wandb": False, **extra}
    return load_config(CONFIGS_DIR / "tiny.yaml", [f"{k}={v}" for k, v in over.items()])


def build(cfg, rank=0, world=1):
    from llmstack.data.hf import build_hf_data
    return build_hf_data(cfg, rank, world)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Alice has 2 pens and finds 3 more. How many pens now?"},
    {"role": "assistant", "content": "Alice has 5 pens."},
    {"role": "user", "content": "And Bob?"},
    {"role": "assistant", "content": "Bob has 7 coins."},
]


def test_chat_flags_cover_exactly_the_assistant_turns():
    from transformers import AutoTokenizer
    from llmstack.data.hf import chat_tokens
    tok = AutoTokenizer.from_pretrained(str(example_dir() / "tiny-llama"))
    ids, flags = chat_tokens(tok, CONVERSATION)
    trained = tok.decode([i for i, f in zip(ids, flags) if f], skip_special_tokens=False)
    assert trained == "Alice has 5 pens.<|im_end|>\nBob has 7 coins.<|im_end|>\n"
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)


def test_sft_loss_counts_only_assistant_tokens(tmp_path):
    """Hand-made data through the whole pipeline: targets are -100 except on assistant tokens, and
    the model's loss equals cross-entropy over exactly those positions."""
    import datasets
    from transformers import AutoTokenizer
    from llmstack.data.hf import chat_tokens
    from llmstack.model import Llama
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Carol has 1 card."}]
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": CONVERSATION}, {"messages": other}] * 4),
                               "validation": datasets.Dataset.from_list([{"messages": other}] * 6)})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = hf_cfg(tmp_path, [tmp_path / "ds"], **{"data.format": "chat"})
    data = build(cfg)
    assert data.meta["train_docs"] == 8 and data.meta["val_docs"] == 6
    tok = AutoTokenizer.from_pretrained(cfg.data.tokenizer_path)
    ids1, fl1 = chat_tokens(tok, CONVERSATION)
    ids2, fl2 = chat_tokens(tok, other)
    flat_ids = np.concatenate([ids1, ids2] * 4)
    # the target at t is kept iff token t+1 is an assistant token of the same document
    doc = np.concatenate([[d] * len(x) for d, x in enumerate([ids1, ids2] * 4)])
    flat_fl = np.concatenate([fl1, fl2] * 4)
    loader = data.train
    model = Llama(cfg.model).eval()
    for w in range(loader.n_windows):
        b = loader.window_batch(torch.tensor([w]))
        s = w * cfg.data.seq_len
        x, y = b.input[0].numpy(), b.target[0].numpy()
        assert (x == flat_ids[s: s + 32]).all()
        keep = (flat_fl[s + 1: s + 33] == 1) & (doc[s + 1: s + 33] == doc[s: s + 32])
        assert ((y != -100) == keep).all()
        assert (y[keep] == flat_ids[s + 1: s + 33][keep]).all()
        with torch.no_grad():
            logits = model(b.input, position_ids=b.position_ids, doc_ids=b.doc_ids)[0]
            if keep.any():
                manual = torch.nn.functional.cross_entropy(logits[torch.from_numpy(keep)], b.target[0][torch.from_numpy(keep)],
                                                           reduction="sum")
                ours = model(b.input, b.target, position_ids=b.position_ids, doc_ids=b.doc_ids, reduction="sum")
                assert torch.allclose(ours, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("streaming", [False, True])
def test_saved_validation_split_is_used_as_is(tmp_path, streaming):
    """A save_to_disk dataset with its own validation split: every train record stays in train, in
    order, and validation holds exactly the saved split (no document moved by content hash)."""
    import datasets
    from transformers import AutoTokenizer
    train = [{"text": f"Train document {i}: Alice has {i} pens."} for i in range(40)]
    val = [{"text": f"Held-out document {i}: Bob has {i} coins."} for i in range(5)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "validation": datasets.Dataset.from_list(val)}).save_to_disk(str(tmp_path / "ds"))
    # a hash split of one half would move ~20 train documents if it were applied
    data = build(hf_cfg(tmp_path, [tmp_path / "ds"], **{"data.val_split_fraction": 0.5, "data.streaming": streaming}))
    assert (data.meta["train_docs"], data.meta["val_docs"]) == (40, 5)
    tok = AutoTokenizer.from_pretrained(data.meta["tokenizer_path"])
    folder = Path(data.meta["cache"])
    for split, records in (("train", train), ("val", val)):
        want = [t for r in records for t in tok(r["text"])["input_ids"] + [tok.eos_token_id]]
        assert np.fromfile(folder / f"{split}.tokens.bin", dtype=np.uint32).tolist() == want


def test_text_windows_keep_document_boundaries(tmp_path):
    ex = example_dir()
    data = build(hf_cfg(tmp_path, [ex / "corpus.jsonl"]))
    eot = data.tokenizer.eot_id
    b = data.train.next_batch()
    # documents end with eos, so the default loader's doc_layout must agree with the cached doc index
    doc_ids, pos = doc_layout(b.input, eot)
    assert torch.equal(b.doc_ids, doc_ids) and torch.equal(b.position_ids, pos)
    assert (b.target[b.input == eot] == -100).all()  # no prediction across documents
    assert (b.target[b.input != eot] != -100).all()
    assert data.meta["val_docs"] > 0 and data.meta["train_docs"] > data.meta["val_docs"]


def test_cache_reused_and_keyed(tmp_path):
    from llmstack.data.hf import cache_key
    ex = example_dir()
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(ex / "corpus.jsonl", corpus)
    cfg = hf_cfg(tmp_path, [corpus])
    first = build(cfg).meta["cache"]
    stamp = (Path(first) / "meta.json").stat().st_mtime_ns
    assert build(cfg).meta["cache"] == first and (Path(first) / "meta.json").stat().st_mtime_ns == stamp
    assert cache_key(hf_cfg(tmp_path, [corpus], **{"data.val_split_fraction": 0.2})) != cache_key(cfg)
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "Dave has 1 pens."}) + "\n")
    assert cache_key(cfg) != Path(first).name


def test_resume_and_data_parallel_shards(tmp_path):
    ex = example_dir()
    cfg = hf_cfg(tmp_path, [ex / "corpus.jsonl"])
    a = build(cfg).train
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = build(cfg).train
    b.load_state_dict(state)
    assert torch.equal(a.next_batch().input, b.next_batch().input)
    with pytest.raises(DataError, match="data changed since the checkpoint"):
        b.load_state_dict({**state, "cache_key": "0000"})
    whole = build(hf_cfg(tmp_path, [ex / "corpus.jsonl"], **{"train.micro_batch_size": 4})).train.next_batch()
    r0, r1 = build(cfg, 0, 2).train.next_batch(), build(cfg, 1, 2).train.next_batch()
    assert torch.equal(torch.cat([r0.input, r1.input]), whole.input)


def test_num_proc_and_streaming_give_identical_caches(tmp_path):
    ex = example_dir()
    arrays = []
    for name, extra in [("one", {}), ("two", {"data.num_proc": 2}), ("stream", {"data.streaming": True})]:
        folder = Path(build(hf_cfg(tmp_path / name, [ex / "chat.jsonl"], **{"data.format": "chat", **extra})).meta["cache"])
        arrays.append([np.fromfile(folder / f"{s}.{k}.bin", dtype=np.uint8) for s in ("train", "val")
                       for k in ("tokens", "flags", "docs")])
    for other in arrays[1:]:
        assert all(np.array_equal(x, y) for x, y in zip(arrays[0], other))


def test_text_and_parquet_files(tmp_path):
    import datasets
    ex = example_dir()
    rows = [json.loads(line) for line in (ex / "corpus.jsonl").read_text().splitlines()]
    (tmp_path / "c.txt").write_text("\n".join(r["text"] for r in rows) + "\n")
    datasets.Dataset.from_list([{"body": r["text"]} for r in rows]).to_parquet(str(tmp_path / "c.parquet"))
    t = build(hf_cfg(tmp_path / "t", [tmp_path / "c.txt"])).meta
    p = build(hf_cfg(tmp_path / "p", [tmp_path / "c.parquet"], **{"data.text_field": "body"})).meta
    assert t["train_tokens"] + t["val_tokens"] == p["train_tokens"] + p["val_tokens"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    ex = example_dir()
    with pytest.raises(DataError, match=r"data.paths: .*nope.jsonl: no such file"):
        build(hf_cfg(tmp_path, [tmp_path / "nope.jsonl"]))
    with pytest.raises(DataError, match=r"data.text_field: no field 'body'"):
        build(hf_cfg(tmp_path, [ex / "corpus.jsonl"], **{"data.text_field": "body"}))
    with pytest.raises(DataError, match=r"records need a 'messages' field"):
        build(hf_cfg(tmp_path, [ex / "corpus.jsonl"], **{"data.format": "chat"}))
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match=r"x.bin: not a supported file"):
        build(hf_cfg(tmp_path, [tmp_path / "x.bin"]))

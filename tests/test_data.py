import numpy as np
import pytest
import torch

from llmstack.data import DataError, PackedLoader, build_corpus, build_data, doc_layout, is_val, stdlib_files
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("run"))
    return cfg, build_data(cfg)


def test_corpus_is_stdlib_without_tests(bundle):
    files = stdlib_files()
    assert len(files) > 300
    assert not any("/test/" in f.as_posix() or f.name.startswith("test_") for f in files)
    cfg, data = bundle
    assert data.meta["files"] > 100 and data.meta["val_tokens"] > 0
    assert data.tokenizer.vocab_size == 512
    text = "def main():\n    return 42\n"
    assert data.tokenizer.decode(data.tokenizer.encode(text)) == text


def test_split_is_by_path_hash():
    assert is_val("json/decoder.py", 0.02) == is_val("json/decoder.py", 0.02)
    share = np.mean([is_val(f"pkg/mod{i}.py", 0.1) for i in range(5000)])
    assert 0.08 < share < 0.12


def test_loader_is_deterministic_and_resumes(bundle):
    cfg, data = bundle
    mk = lambda: PackedLoader(data.train.tokens, 64, 4, seed=7, eot_id=data.meta["eot_id"])  # noqa: E731
    a, b = mk(), mk()
    for _ in range(3):
        torch.testing.assert_close(a.next_batch().input, b.next_batch().input)
    state = a.state_dict()
    expected = [a.next_batch().input for _ in range(3)]
    c = mk()
    c.load_state_dict(state)
    for e in expected:
        torch.testing.assert_close(c.next_batch().input, e)
    other_seed = PackedLoader(data.train.tokens, 64, 4, seed=8, eot_id=data.meta["eot_id"])
    assert not torch.equal(other_seed.next_batch().input, mk().next_batch().input)


def test_targets_are_inputs_shifted(bundle):
    _, data = bundle
    b = data.train.next_batch()
    assert b.input.shape == b.target.shape == (4, 64)
    torch.testing.assert_close(b.input[:, 1:], b.target[:, :-1])


def test_data_parallel_ranks_split_the_global_batch(bundle):
    _, data = bundle
    eot = data.meta["eot_id"]
    whole = PackedLoader(data.train.tokens, 64, 4, seed=1, eot_id=eot).next_batch().input
    halves = [PackedLoader(data.train.tokens, 64, 2, seed=1, eot_id=eot, rank=r, world=2).next_batch().input
              for r in range(2)]
    torch.testing.assert_close(torch.cat(halves), whole)


def test_doc_layout_restarts_positions_after_end_of_text():
    x = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4]])
    doc, pos = doc_layout(x, eot_id=0)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


def test_seq_len_longer_than_data_is_one_line(bundle):
    _, data = bundle
    with pytest.raises(DataError, match="data.seq_len"):
        PackedLoader(data.val.tokens[:100], 64, 4, seed=0, eot_id=0, name="val")


def test_bad_files_are_skipped_and_counted(tmp_path):
    src = tmp_path / "lib"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "good.py").write_text("x = 1\n" * 400)
    (src / "pkg" / "more.py").write_text("def f(a):\n    return a\n" * 300)
    (src / "empty.py").write_text("")
    (src / "latin.py").write_bytes(b"s = '\xe9\xff'\n")
    (src / "blob.py").write_bytes(bytes(range(256)) * 4)
    (src / "test").mkdir()
    (src / "test" / "t.py").write_text("ignored = True\n")
    cfg = tiny_config(tmp_path / "run", **{"data.dir": str(tmp_path / "data"), "data.tokenizer": "bytes",
                                            "model.vocab_size": 257})
    folder = build_corpus(cfg, source_root=src)
    import json
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["files"] == 2 and meta["skipped"] == {"empty": 1, "not_utf8": 2, "unreadable": 0}


def test_token_ids_beyond_vocab_name_the_file(tmp_path, bundle):
    import shutil
    from llmstack.data import corpus_dir, open_split
    cfg, _ = bundle
    copy = tmp_path / "corpus"
    shutil.copytree(corpus_dir(cfg.data, cfg.model.vocab_size), copy)
    tokens = np.fromfile(copy / "val.bin", dtype=np.uint16)
    tokens[5] = 600  # >= vocab 512
    tokens.tofile(copy / "val.bin")
    with pytest.raises(DataError, match=r"val.bin: token id 600 >= vocab size 512"):
        open_split(copy, "val")


def test_data_build_takes_overrides_after_the_action(bundle, capsys):
    import json
    from llmstack.cli import main
    from tests.helpers import TEST_DATA_DIR
    assert main(["data", "build", f"data.dir={TEST_DATA_DIR}", "data.max_files=120", "model.vocab_size=512"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dir"].endswith("bpe512-max120")

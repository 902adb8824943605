"""Bad input through the real CLI: exit status 2, one line naming what is wrong, no traceback,
and nothing that already existed is modified."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli, tiny_overrides


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "wandb" not in p.parts}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    res = run_cli("train", *tiny_overrides(run, **{"train.max_steps": 4, "checkpoint.every_steps": 4}))
    assert res.returncode == 0, res.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory, good_run):
    d = tmp_path_factory.mktemp("inputs")
    (d / "malformed.yaml").write_text("train:\n  max_steps: [1, 2\n")
    (d / "latin1.yaml").write_bytes(b"run_name: caf\xe9\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes(b"caf\xe9 " * 50)
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    ck = good_run / "checkpoints" / "step_4"
    for name, mutate in [("truncated", lambda b: b[: len(b) // 2]), ("altered", lambda b: b[:-9] + b"corrupted")]:
        bad = d / name
        shutil.copytree(ck, bad)
        f = bad / "model.safetensors"
        f.write_bytes(mutate(f.read_bytes()))
    nomanifest = d / "no_manifest"
    shutil.copytree(ck, nomanifest)
    (nomanifest / "manifest.json").unlink()
    f = nomanifest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    # a corpus whose token file holds ids beyond the vocabulary
    from tests.helpers import TEST_DATA_DIR
    corpus = d / "corpus"
    src = next(p for p in TEST_DATA_DIR.iterdir() if p.name == "bpe512-max120")
    shutil.copytree(src, corpus / src.name)
    tokens = np.fromfile(corpus / src.name / "train.bin", dtype=np.uint16)
    tokens[10] = 9000
    tokens.tofile(corpus / src.name / "train.bin")
    # an HF model folder with one tensor removed from its safetensors
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = d / "hf_missing"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(str(hf))
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return d


CASES = {
    "malformed_yaml": (lambda f, r: ["train", "--config", str(f / "malformed.yaml")], "not valid YAML"),
    "non_utf8_yaml": (lambda f, r: ["train", "--config", str(f / "latin1.yaml")], "not UTF-8"),
    "yaml_not_mapping": (lambda f, r: ["train", "--config", str(f / "list.yaml")], "must be a mapping"),
    "missing_config": (lambda f, r: ["train", "--config", str(f / "nope.yaml")], "not found"),
    "unknown_key": (lambda f, r: ["train", "train.max_stepz=3"], "unknown key train.max_stepz"),
    "unknown_section": (lambda f, r: ["train", "trian.max_steps=3"], "unknown key trian"),
    "wrong_type": (lambda f, r: ["train", "train.max_steps=abc"], "train.max_steps"),
    "bad_literal": (lambda f, r: ["train", "precision=fp16"], "precision: got 'fp16', allowed: 'fp32', 'bf16'"),
    "out_of_range": (lambda f, r: ["train", "optim.lr=-1"], "optim.lr"),
    "bad_override_syntax": (lambda f, r: ["train", "optim.lr"], "section.key=value"),
    "pp_with_zero3": (lambda f, r: ["train", "parallel.pp=2", "parallel.zero_stage=3"], "parallel.zero_stage"),
    "tp_not_dividing_heads": (lambda f, r: ["train", "parallel.tp=3"], "parallel.tp"),
    "seq_len_over_context": (lambda f, r: ["train", "data.seq_len=999"], "data.seq_len"),
    "seq_len_longer_than_data": (lambda f, r: ["train", *tiny_overrides(r.parent / "x1", **{
        "data.seq_len": 50000, "model.max_seq_len": 50000})], "data.seq_len"),
    "token_ids_beyond_vocab": (lambda f, r: ["train", *tiny_overrides(r.parent / "x2", **{
        "data.dir": str(f / "corpus")})], "token id 9000"),
    "checkpoint_shape_mismatch": (lambda f, r: ["train", *tiny_overrides(r, **{"model.dim": 32})], "has shape"),
    "eval_missing_checkpoint": (lambda f, r: ["eval", "--checkpoint", str(f / "nothing")], "no such checkpoint"),
    "eval_not_a_checkpoint": (lambda f, r: ["eval", "--checkpoint", str(f)], "neither a checkpoint"),
    "eval_truncated_safetensors": (lambda f, r: ["eval", "--checkpoint", str(f / "truncated")], "model.safetensors: size"),
    "eval_altered_safetensors": (lambda f, r: ["eval", "--checkpoint", str(f / "altered")], "model.safetensors: checksum"),
    "eval_corrupt_no_manifest": (lambda f, r: ["eval", "--checkpoint", str(f / "no_manifest")], "no manifest.json"),
    "eval_missing_text_file": (lambda f, r: ["eval", "--checkpoint", str(r), "--text-file", str(f / "no.txt")], "--text-file"),
    "eval_empty_text_file": (lambda f, r: ["eval", "--checkpoint", str(r), "--text-file", str(f / "empty.txt")], "at least 2 tokens"),
    "eval_non_utf8_text": (lambda f, r: ["eval", "--checkpoint", str(r), "--text-file", str(f / "latin1.txt")], "not UTF-8"),
    "eval_binary_text": (lambda f, r: ["eval", "--checkpoint", str(r), "--text-file", str(f / "binary.txt")], "not UTF-8"),
    "prompt_longer_than_context": (lambda f, r: ["generate", "--checkpoint", str(r), "--prompt", "x = 1\n" * 400],
                                   "exceeds the model's context"),
    "unknown_command": (lambda f, r: ["trian"], "unknown command"),
    "resume_missing_folder": (lambda f, r: ["train", "train.resume=" + str(f / "nothing")], "train.resume"),
    "resume_weights_only": (lambda f, r: ["train", *tiny_overrides(r.parent / "x3", **{
        "train.resume": str(f / "hf_missing")})], "holds weights only"),
    "hf_folder_missing_tensor": (lambda f, r: ["eval", "--checkpoint", str(f / "hf_missing"), "--text-file",
                                               str(f / "latin1.yaml")], "model.layers.1.mlp.down_proj.weight"),
    "convert_hf_missing_tensor": (lambda f, r: ["convert", "--to", "llmstack", str(f / "hf_missing"),
                                                str(r.parent / "converted")], "model.layers.1.mlp.down_proj.weight"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, files, good_run):
    make_args, expected = CASES[case]
    before = _snapshot(good_run)
    res = run_cli(*make_args(files, good_run))
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("llmstack: error:")]
    assert len(errors) == 1, res.stderr
    assert expected in errors[0], errors[0]
    assert _snapshot(good_run) == before, "an existing output was modified"


def test_debug_flag_shows_the_traceback():
    res = run_cli("train", "optim.lr=-1", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr

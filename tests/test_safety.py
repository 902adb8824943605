"""Safe loading and no leaked secrets, each shown on an input that would break it.

- A pickle planted where weights are looked for is never unpickled (unpickling would run it).
- A model folder that ships its own Python code (`auto_map`) never gets that code run.
- No source in llmstack/ calls an unpickler or asks transformers to trust remote code.
- A W&B key in the environment or in ~/.netrc appears in nothing a run writes or prints.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmstack.errors import UserError
from llmstack.pretrained import load_pretrained
from tests.helpers import ROOT, tiny_overrides
from tests.test_hf_data import example_dir


class _RunsOnUnpickle:
    """Unpickling this writes `marker`: the payload of a malicious pytorch_model.bin."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def _hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(example_dir() / "tiny-llama", folder)
    return folder


def _refused(folder: Path, marker: Path, names: str) -> None:
    try:
        load_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - checked below, after the marker
        err = e
    else:
        err = None
    assert not marker.exists(), f"{folder}: the planted pickle was unpickled (and ran)"
    assert isinstance(err, UserError) and names in str(err), repr(err)


def test_planted_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    torch.save(_RunsOnUnpickle(marker), tmp_path / "payload.bin")  # what a malicious checkpoint looks like
    payload = (tmp_path / "payload.bin").read_bytes()
    hf = _hf_folder(tmp_path)  # HF folder whose weights exist only as a pickle
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(payload)
    _refused(hf, marker, "pytorch_model.bin")
    hf_st = _hf_folder(tmp_path / "b")  # a pickle saved under the safetensors name
    (hf_st / "model.safetensors").write_bytes(payload)
    _refused(hf_st, marker, "safetensors")


EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_model_folder_code_is_never_run(tmp_path):
    """Every way llmstack reads an HF folder: a model (`--checkpoint`, init_from), its tokenizer, and
    data tokenization (data.tokenizer_path)."""
    from llmstack.data import Tokenizer
    from llmstack.data.hf import make_tokenize_fn
    marker = tmp_path / "ran"
    hf = _hf_folder(tmp_path)
    (hf / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    for name, auto_map in (("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]})):
        data = json.loads((hf / name).read_text())
        (hf / name).write_text(json.dumps({**data, "auto_map": auto_map}))
    for load in (lambda: load_pretrained(hf),
                 lambda: Tokenizer("hf", hf),
                 lambda: make_tokenize_fn(str(hf), "text", "text", 0.1, False)({"text": ["Alice has 2 pens."]})):
        try:
            load()
        except (UserError, ValueError, OSError):
            pass  # refusing is fine too; running the folder's code is not
        assert not marker.exists(), load
    assert load_pretrained(hf).tokenizer.encode("Alice")  # and the folder still loads, with our own classes


# (module, function) pairs that unpickle
_UNPICKLERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
               ("dill", "loads"), ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads")}


def unsafe_calls(source: str) -> list[str]:
    """Unpickling calls and trust_remote_code other than a literal False, in one Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = (f.value.id, f.attr) if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        kw = {k.arg: k.value for k in node.keywords}
        if name in _UNPICKLERS and not (name == ("torch", "load") and _is_const(kw.get("weights_only"), True)):
            found.append(f"line {node.lineno}: {'.'.join(name)}")
        if name in {("np", "load"), ("numpy", "load")} and not _is_const(kw.get("allow_pickle", ast.Constant(False)), False):
            found.append(f"line {node.lineno}: {'.'.join(name)} with allow_pickle")
        if "trust_remote_code" in kw and not _is_const(kw["trust_remote_code"], False):
            found.append(f"line {node.lineno}: trust_remote_code")
    return found


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_the_source_check_finds_what_it_looks_for():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\nnp.load(p, allow_pickle=True)\n"
           "AutoModel.from_pretrained(p, trust_remote_code=True)\nAutoTokenizer.from_pretrained(p, trust_remote_code=flag)\n")
    assert len(unsafe_calls(bad)) == 6, unsafe_calls(bad)
    ok = "torch.load(p, weights_only=True)\nnp.load(p)\nAutoTokenizer.from_pretrained(p, trust_remote_code=False)\n"
    assert unsafe_calls(ok) == []


def test_no_source_unpickles_or_trusts_remote_code():
    sources = sorted((ROOT / "llmstack").rglob("*.py"))
    assert len(sources) > 20
    bad = {str(p.relative_to(ROOT)): found for p in sources if (found := unsafe_calls(p.read_text()))}
    assert not bad, bad


@pytest.mark.slow
def test_wandb_key_is_in_nothing_a_run_writes_or_prints(tmp_path):
    """A training run with W&B on (offline), a key in WANDB_API_KEY and a second one in ~/.netrc
    (where `wandb login` puts it): neither appears in the run folder (config.yaml, metrics.jsonl,
    summary.json, checkpoints, the W&B run files and logs) nor in stdout/stderr."""
    env_key, netrc_key = "0123456789abcdef0123456789abcdef01234567", "fedcba9876543210fedcba9876543210fedcba98"
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {netrc_key}\n")
    out = tmp_path / "run"
    env = {**os.environ, "HOME": str(home), "WANDB_API_KEY": env_key, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmstack", "train", *tiny_overrides(
        out, **{"train.max_steps": 3, "train.eval_every": 3, "checkpoint.every_steps": 3, "logging.wandb": True,
                "train.sample_tokens": 8})], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = [f for f in out.rglob("*") if f.is_file()]
    names = {f.name for f in written}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"} <= names, names
    assert any(f.suffix == ".wandb" for f in written), "no W&B run files were written: nothing was checked"
    for key in (env_key, netrc_key):
        assert key not in proc.stdout + proc.stderr
        for f in written:
            assert key.encode() not in f.read_bytes(), f

"""PEFT adapters both ways, proven by peft itself.

- `llmstack export --format peft` on a LoRA checkpoint: `peft.PeftModel.from_pretrained` on the HF
  base (the base's own folder, or the HF export written beside the adapter) gives llmstack's
  LoRA logits; so does peft 0.13 under transformers 4.45 (the oldest versions pyproject allows).
- A PEFT adapter folder as `init_from`: merged into a plain model, or loaded into llmstack's LoRA
  adapters to continue training; both give PeftModel's logits, and the adapter exported again
  round-trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmstack import checkpoint as ckpt
from llmstack.kernels import resolve_ops
from llmstack.lora import LoraError
from llmstack.pretrained import build_model, lora_model_of_checkpoint
from tests import compat_venv
from tests.helpers import run_cli, tiny_config
from tests.test_recipes import recipe_config

TOL = 1e-5


def _lora_checkpoint(tmp_path, cfg):
    """A LoRA checkpoint (adapters only, as LocalEngine writes it) with non-zero B matrices."""
    import yaml
    from llmstack.config import to_dict
    model = build_model(cfg, torch.device("cpu"), resolve_ops("auto", "cpu"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path / "ck"
    folder.mkdir()
    ckpt.save_model(model, folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    ckpt.write_manifest(folder)  # as every llmstack save does
    return folder, model


def _hf_base_cfg(tmp_path, **lora):
    cfg = recipe_config("lora", tmp_path)  # init_from: hf:<example tiny llama>
    for k, v in {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", "w1", "w2"], **lora}.items():
        setattr(cfg.lora, k, v)
    return cfg


def _peft_logits(base_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("base", ["hf", "seeded"])
def test_exported_adapter_loads_in_peft_with_the_same_logits(tmp_path, base):
    cfg = _hf_base_cfg(tmp_path) if base == "hf" else tiny_config(
        tmp_path, **{"lora.enabled": "true", "lora.rank": 4, "lora.targets": "[wq,wk,w3]"})
    folder, model = _lora_checkpoint(tmp_path, cfg)
    r = run_cli("export", "--format", "peft", "--checkpoint", str(folder), "--out", str(tmp_path / "adapter"))
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    pc = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert pc["peft_type"] == "LORA" and pc["r"] == 4 and pc["base_model_name_or_path"] == info["base_model_name_or_path"]
    if base == "hf":
        assert pc["base_model_name_or_path"] == str(Path(cfg.init_from[3:]).resolve())
        assert sorted(pc["target_modules"]) == ["down_proj", "gate_proj", "q_proj", "v_proj"]
    else:
        assert pc["base_model_name_or_path"] == str((tmp_path / "adapter" / "base").resolve())
    ids = torch.randint(0, cfg.model.vocab_size, (2, 20))
    with torch.no_grad():
        ours = model(ids)
    diff = (_peft_logits(pc["base_model_name_or_path"], tmp_path / "adapter", ids) - ours).abs().max().item()
    assert diff <= TOL, diff
    print(json.dumps({"base": base, "peft_max_logit_diff": diff}))


def _peft_adapter(tmp_path, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8):
    """An adapter written by peft itself on the example HF base, with random B matrices."""
    import peft
    from transformers import AutoModelForCausalLM
    from tests.test_hf_data import example_dir
    base_dir = example_dir() / "tiny-llama"
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(tmp_path / "peft_adapter"))
    return base_dir, tmp_path / "peft_adapter"


def test_peft_adapter_as_init_from_merges_or_continues_lora_and_round_trips(tmp_path):
    base_dir, adapter = _peft_adapter(tmp_path)
    ids = torch.randint(0, 384, (2, 16))
    ref = _peft_logits(base_dir, adapter, ids)
    ops = resolve_ops("auto", "cpu")

    merged_cfg = recipe_config("sft", tmp_path)
    merged_cfg.init_from = str(adapter)  # full fine-tuning from base + adapter merged
    with torch.no_grad():
        assert (build_model(merged_cfg, torch.device("cpu"), ops)(ids) - ref).abs().max().item() <= TOL

    cfg = _hf_base_cfg(tmp_path, targets=["wq", "wv", "w2"])
    cfg.init_from = str(adapter)  # continue LoRA training from the adapter's A/B weights
    model = build_model(cfg, torch.device("cpu"), ops)
    with torch.no_grad():
        assert (model(ids) - ref).abs().max().item() <= TOL
    bad = _hf_base_cfg(tmp_path, rank=8, targets=["wq", "wv", "w2"])
    bad.init_from = str(adapter)
    with pytest.raises(LoraError, match="lora.rank"):
        build_model(bad, torch.device("cpu"), ops)

    # a run from the adapter trains, and its checkpoint exports back to PEFT
    from llmstack.train import train
    cfg.train.max_steps, cfg.checkpoint.every_steps, cfg.train.eval_every = 2, 2, 2
    train(cfg)
    last = ckpt.latest_checkpoint(cfg.run_dir)
    r = run_cli("export", "--format", "peft", "--checkpoint", str(last), "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr[-2000:]
    trained, _, _ = lora_model_of_checkpoint(last)
    with torch.no_grad():
        ours = trained(ids)
    assert (ours - ref).abs().max().item() > 1e-4  # it trained
    assert (_peft_logits(base_dir, tmp_path / "again", ids) - ours).abs().max().item() <= TOL


PEFT_013 = r"""
import json, sys
import torch, transformers, peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
adapter, ids_path = sys.argv[1], sys.argv[2]
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.load(open(ids_path)))).logits
print(json.dumps({"peft": peft.__version__, "transformers": transformers.__version__, "logits": logits.tolist()}))
"""


@pytest.mark.slow
def test_peft_013_on_transformers_445_loads_the_exported_adapter(tmp_path):
    cfg = _hf_base_cfg(tmp_path, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    folder, model = _lora_checkpoint(tmp_path, cfg)
    assert run_cli("export", "--format", "peft", "--checkpoint", str(folder), "--out",
                   str(tmp_path / "adapter")).returncode == 0
    ids = torch.randint(0, 384, (2, 16))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    res = compat_venv.run_script("transformers-4.45", PEFT_013, str(tmp_path / "adapter"), str(tmp_path / "ids.json"))
    assert res["peft"].startswith("0.13") and res["transformers"].startswith("4.45")
    with torch.no_grad():
        diff = (torch.tensor(res["logits"]) - model(ids)).abs().max().item()
    assert diff <= TOL, diff
    print(json.dumps({"peft": res["peft"], "max_logit_diff": diff}))

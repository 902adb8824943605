"""LoRA: only adapters train and are saved, base weights stay put, save -> load gives the same
output, merged == base + adapter forward, a LoRA run resumes bit-identically, merged HF export."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from llmstack import checkpoint as ckpt
from llmstack.config import LoraConfig, ModelConfig
from llmstack.lora import adapter_state_dict, apply_lora, load_adapter, merge_lora, save_adapter
from llmstack.pretrained import load_lora_checkpoint
from llmstack.model import Llama
from tests.helpers import tiny_config, train_losses

MCFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def lora_model(seed=0, targets=ALL):
    torch.manual_seed(seed)
    return apply_lora(Llama(MCFG), LoraConfig(enabled=True, rank=4, alpha=8.0, targets=targets))


def _train_a_bit(model, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 16), generator=g)
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()


def test_only_adapters_train_and_base_is_unchanged():
    model = lora_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(ALL) * MCFG.n_layers
    _train_a_bit(model)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_saved_state_is_adapters_only_and_roundtrips(tmp_path):
    model = lora_model(targets=["wq", "wv", "w2"])
    _train_a_bit(model)
    ckpt.save_model(model, tmp_path)  # what LocalEngine.save does
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    assert len(keys) == 2 * 3 * MCFG.n_layers
    x = torch.randint(0, 64, (2, 12))
    fresh = lora_model(targets=["wq", "wv", "w2"])  # same seeded base, new adapters
    assert not torch.allclose(fresh(x), model(x))
    ckpt.load_model_state(fresh, tmp_path / "model.safetensors")
    assert torch.equal(fresh(x), model(x))
    save_adapter(model, tmp_path / "adapter")
    again = lora_model(targets=["wq", "wv", "w2"])
    load_adapter(again, tmp_path / "adapter")
    assert torch.equal(again(x), model(x))
    assert set(adapter_state_dict(model)) == set(keys)


def test_merged_model_equals_base_plus_adapter():
    model = lora_model()
    _train_a_bit(model)
    merged = merge_lora(model)
    assert type(merged.layers[0].attention.wq) is torch.nn.Linear
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        diff = (merged(x) - model(x)).abs().max().item()
    assert diff <= 1e-5, diff
    # and the merge is really base + scaling * B @ A
    wq = model.layers[0].attention.wq
    expect = wq.base_layer.weight + wq.scaling["default"] * wq.lora_B["default"].weight @ wq.lora_A["default"].weight
    assert torch.allclose(merged.layers[0].attention.wq.weight, expect, atol=1e-6)


def test_apply_twice_is_an_error():
    with pytest.raises(Exception, match="already has LoRA adapters"):
        apply_lora(lora_model(), LoraConfig(enabled=True))


@pytest.mark.slow
def test_lora_run_resumes_identically_and_exports_merged(tmp_path):
    from transformers import AutoModelForCausalLM
    from llmstack.cli.convert import convert_main
    from llmstack.train import train
    extra = {"lora.enabled": "true", "lora.targets": "[wq,wv,w1,w2]", "optim.lr": "1e-2", "train.max_steps": 8,
             "checkpoint.every_steps": 4, "train.eval_every": 4,
             # the first leg stops at step 4 inside the warmup, so its lr equals the full run's
             "schedule.warmup_steps": 4}
    train(tiny_config(tmp_path / "full", **extra))
    train(tiny_config(tmp_path / "split", **{**extra, "train.max_steps": 4}))
    train(tiny_config(tmp_path / "split", **extra))  # resumes from step 4
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert [full[s] for s in range(5, 9)] == [split[s] for s in range(5, 9)]
    latest = ckpt.latest_checkpoint(tmp_path / "full")
    with safe_open(str(latest / "model.safetensors"), framework="pt") as f:
        assert all("lora_" in k for k in f.keys())
    pre = load_lora_checkpoint(tmp_path / "full")
    assert convert_main(["--to", "hf", str(tmp_path / "full"), str(tmp_path / "hf")]) == 0
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert (hf_model(input_ids=x).logits - pre.model(x)).abs().max().item() <= 1e-4
    # every --checkpoint command reads the adapters-only run (base from init_from + adapters)
    from llmstack.pretrained import load_pretrained
    via_cli_loader = load_pretrained(tmp_path / "full")
    with torch.no_grad():
        assert (via_cli_loader.model(x) - pre.model(x)).abs().max().item() == 0

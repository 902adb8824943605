"""HF <-> llmstack conversion: logits parity in both directions for every supported architecture,
gradient parity of one training step, sharded input, and one-line errors naming the tensor."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmstack import hf
from llmstack.cli.convert import convert_main
from llmstack.pretrained import load_weights_into

# --- tiny random HF models built locally (no downloads); other test_hf_* files import these ---

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)

# name -> (config class name, extra config); covers GQA, tied/untied and llama3 rope scaling
ARCHS = {
    "llama_tied_scaled": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=128,
                                              rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=500000.0)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, num_key_value_heads=1)),
}


def make_hf_model(arch: str, seed: int = 0):
    import transformers
    cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random everything (norm weights and zero-initialized biases included)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if name.endswith("bias") else 0.08)
    return model.eval()


def save_hf_model(arch: str, folder: Path, seed: int = 0, **save_kwargs) -> Path:
    model = make_hf_model(arch, seed)
    model.save_pretrained(str(folder), **save_kwargs)
    return Path(folder)


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


TOL = 1e-4


def _ids(seed=1, B=2, T=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {a: save_hf_model(a, root / a) for a in ARCHS}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_parity_both_directions(arch, hf_folders, tmp_path):
    from transformers import AutoModelForCausalLM
    ids = _ids()
    ref = hf_logits(make_hf_model(arch), ids)
    pre = hf.load_hf(hf_folders[arch], backend="torch")
    ours = pre.model(ids)
    diff = (ours - ref).abs().max().item()
    print(f"parity {arch}: hf->llmstack max abs diff {diff:.2e}")
    assert diff <= TOL, f"{arch}: logits differ by {diff:.2e}"

    out = hf.export_hf(pre.model, pre.cfg, pre.tokenizer, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    diff_back = (hf_logits(back, ids) - ref).abs().max().item()
    print(f"parity {arch}: llmstack->hf max abs diff {diff_back:.2e}")
    assert diff_back <= TOL
    assert back.config.tie_word_embeddings == pre.cfg.model.tie_embeddings


def test_config_mapping_details(hf_folders):
    llama = hf.load_hf(hf_folders["llama_tied_scaled"]).cfg.model
    assert llama.tie_embeddings and llama.rope_scaling is not None and llama.rope_scaling.factor == 4.0
    assert llama.kv_heads == 2 and llama.hidden_dim == 48
    qwen = hf.load_hf(hf_folders["qwen2"]).cfg.model
    assert qwen.qkv_bias and qwen.kv_heads == 1
    assert hf.load_hf(hf_folders["llama_untied"]).cfg.model.rope_theta == 500000.0


def test_gradients_match_transformers(hf_folders):
    hf_model = make_hf_model("llama_untied").train()
    pre = hf.load_hf(hf_folders["llama_untied"], backend="torch")
    model = pre.model.train()
    ids = _ids(seed=3, B=2, T=24)
    hf_loss = hf_model(input_ids=ids, labels=ids).loss
    hf_loss.backward()
    x, y = ids[:, :-1], ids[:, 1:]
    loss = model(x, y)
    loss.backward()
    assert abs(loss.item() - hf_loss.item()) < 1e-5, (loss.item(), hf_loss.item())
    hf_params = dict(hf_model.named_parameters())
    worst = 0.0
    for ours, theirs in hf.name_map(model.cfg).items():
        g, g_ref = dict(model.named_parameters())[ours].grad, hf_params[theirs].grad
        err = (g - g_ref).abs().max().item()
        worst = max(worst, err)
        assert err <= 1e-5 + 1e-4 * g_ref.abs().max().item(), f"{ours} vs {theirs}: grad diff {err:.2e}"
    print(f"gradient parity llama: max abs diff {worst:.2e}")


def test_sharded_safetensors_roundtrip(tmp_path):
    src = save_hf_model("mistral", tmp_path / "sharded", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
    ids = _ids()
    ref = hf_logits(make_hf_model("mistral"), ids)
    pre = hf.load_hf(src)
    assert (pre.model(ids) - ref).abs().max().item() <= TOL
    out = hf.export_hf(pre.model, pre.cfg, None, tmp_path / "out", model_type="mistral", max_shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (hf.load_hf(out).model(ids) - ref).abs().max().item() <= TOL


def _rewrite(folder, fn):
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


def test_tensor_errors_name_the_tensor(tmp_path):
    src = save_hf_model("llama_untied", tmp_path / "m")
    _rewrite(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.HFConversionError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_hf(src)
    src = save_hf_model("llama_untied", tmp_path / "m2")
    _rewrite(src, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(hf.HFConversionError, match=r"unexpected tensor model\.layers\.0\.self_attn\.extra\.weight"):
        hf.load_hf(src)
    src = save_hf_model("llama_untied", tmp_path / "m3")
    _rewrite(src, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 32)))
    with pytest.raises(hf.HFConversionError, match=r"k_proj\.weight has shape \(8, 32\)"):
        hf.load_hf(src)


def test_unsupported_and_pickled_are_refused(tmp_path):
    src = save_hf_model("llama_untied", tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(hf.HFConversionError, match="GPT2LMHeadModel"):
        hf.load_hf(src)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(hf.HFConversionError, match="pickled weights are never loaded"):
        hf.load_hf(src)


def test_convert_cli_both_ways_with_tokenizer(tmp_path):
    """HF -> llmstack checkpoint -> HF again; the llmstack BPE tokenizer is exported as a fast tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmstack.data import EOT, Tokenizer, train_bpe
    from llmstack.pretrained import load_pretrained
    src = save_hf_model("qwen2", tmp_path / "hf")
    train_bpe(["def f(x):\n    return x + 1\n"] * 20 + ["hello world"] * 5, VOCAB, tmp_path / "tokenizer.json")
    tok = Tokenizer("bpe", tmp_path / "tokenizer.json")
    hf.save_hf_tokenizer(tok, src)
    assert convert_main(["--to", "llmstack", str(src), str(tmp_path / "ck")]) == 0
    ids = _ids()
    ref = hf_logits(make_hf_model("qwen2"), ids)
    pre = load_pretrained(tmp_path / "ck")
    assert pre.kind == "llmstack" and pre.tokenizer is not None
    assert (pre.model(ids) - ref).abs().max().item() <= TOL
    assert convert_main(["--to", "hf", str(tmp_path / "ck"), str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert back.config.model_type == "qwen2"
    assert (hf_logits(back, ids) - ref).abs().max().item() <= TOL
    at = AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert at.eos_token == EOT
    assert at.encode("def f(x):", add_special_tokens=False) == tok.encode("def f(x):")
    from llmstack.outputs import OutputError
    with pytest.raises(OutputError, match="not empty"):
        convert_main(["--to", "hf", str(tmp_path / "ck"), str(tmp_path / "back")])


def test_init_from_checks_config(hf_folders):
    from llmstack.model import Llama
    mcfg = hf.load_hf(hf_folders["llama_untied"]).cfg.model
    model = Llama(mcfg)
    load_weights_into(model, f"hf:{hf_folders['llama_untied']}")
    ids = _ids()
    assert (model(ids) - hf_logits(make_hf_model("llama_untied"), ids)).abs().max().item() <= TOL
    mcfg.rope_theta = 10000.0
    with pytest.raises(hf.HFConversionError, match=r"model\.rope_theta: the run config has 10000.0"):
        load_weights_into(Llama(mcfg), f"hf:{hf_folders['llama_untied']}")

"""`llmstack quantize` writes the standard GPTQ layout and llmstack reads GPTQ folders back.

The proof is the real loader: transformers 5.24 + optimum 2.3 + gptqmodel 7.6 (in their own
environment, tests/compat_venv.py: gptqmodel pins another numpy) load our folders on the CPU, and
llmstack loads a checkpoint that gptqmodel itself quantized (tests/fixtures/gptq_community:
sym, desc_act, v1 zeros). Fast tests check the packing bit by bit with an unpacker written here
from the format's description, not with our reader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmstack.model import Llama
from llmstack.pretrained import load_pretrained
from llmstack.quant import dense_state_dict, quantize_model, save_quantized
from llmstack.quant.gptq_format import GPTQFormatError, check_config, pack_cols, pack_rows, unpack_rows
from tests import compat_venv
from tests.helpers import run_cli, tiny_config

COMMUNITY = Path(__file__).parent / "fixtures" / "gptq_community"


def documented_code(packed: torch.Tensor, row: int, col: int, bits: int, along_rows: bool) -> int:
    """One value from a GPTQ int32 tensor, as the format describes it: 32 / bits values per word,
    value i of a word in bits [bits * i, bits * (i + 1)), words packed along rows (qweight) or
    columns (qzeros)."""
    pf = 32 // bits
    word = int(packed[row // pf, col] if along_rows else packed[row, col // pf]) & 0xFFFFFFFF
    shift = bits * ((row if along_rows else col) % pf)
    return (word >> shift) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_follows_the_documented_bit_layout(bits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2 ** bits, (32, 24), generator=g)
    codes[0, 0] = 2 ** bits - 1  # a top-nibble word: negative as int32
    rows, cols = pack_rows(codes, bits), pack_cols(codes, bits)
    assert rows.dtype == cols.dtype == torch.int32
    assert rows.shape == (32 * bits // 32, 24) and cols.shape == (32, 24 * bits // 32)
    for r in range(32):
        for c in range(24):
            assert documented_code(rows, r, c, bits, True) == codes[r, c]
            assert documented_code(cols, r, c, bits, False) == codes[r, c]
    assert torch.equal(unpack_rows(rows, bits), codes)


def _quantized(tmp_path, bits, method="rtn", act_order=False):
    cfg = tiny_config(tmp_path, **{"model.qkv_bias": "true"})  # biases travel as fp16 GPTQ tensors
    torch.manual_seed(0)
    model = Llama(cfg.model).eval()
    calib = None
    if method == "gptq":
        from llmstack.data import Batch
        g = torch.Generator().manual_seed(1)
        calib = [Batch(torch.randint(0, cfg.model.vocab_size, (4, 32), generator=g), None) for _ in range(2)]
    report = quantize_model(model, bits=bits, group_size=32, method=method, calib_batches=calib, act_order=act_order)
    return cfg, model, report


@pytest.mark.parametrize("bits,method,act_order", [(4, "rtn", False), (8, "rtn", False), (4, "gptq", True)])
def test_saved_layout_is_gptq_and_reads_back_exactly(tmp_path, bits, method, act_order):
    cfg, model, report = _quantized(tmp_path, bits, method, act_order)
    out = save_quantized(model, cfg, tokenizer=None, out=tmp_path / "q", report=report, dtype="float32")
    hf_cfg = json.loads((out / "config.json").read_text())
    qc = hf_cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["checkpoint_format"] == "gptq"
    assert qc["group_size"] == (32 if bits == 4 else -1) and qc["sym"] == (bits == 8) and qc["desc_act"] is False
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert hf_cfg["model_type"] == "qwen2"  # q/k/v biases
    q = model.layers[1].attention.wk
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        pre = "model.layers.1.self_attn.k_proj"
        t = {k: f.get_tensor(f"{pre}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
        assert not [k for k in f.keys() if k.endswith("k_proj.weight")]
    assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == torch.int32
    assert t["scales"].dtype == t["bias"].dtype == torch.float16
    K, N = q.in_features, q.out_features
    w = q.dequantized_weight()
    for k in range(K):  # every weight from the file by the documented formula (v1: stored zero + 1)
        g = int(t["g_idx"][k])
        assert g == (k // 32 if bits == 4 else 0)
        for n in range(0, N, 3):
            code = documented_code(t["qweight"], k, n, bits, True)
            zero = documented_code(t["qzeros"], g, n, bits, False) + 1
            assert float(t["scales"][g, n]) * (code - zero) == pytest.approx(float(w[n, k]), abs=1e-7)
    torch.testing.assert_close(t["bias"].float(), q.bias, atol=0, rtol=0)

    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24))
    back = load_pretrained(out)
    assert back.kind == "quantized"
    with torch.no_grad():
        torch.testing.assert_close(back.model(tokens), model(tokens), atol=0, rtol=0)


def test_legacy_llmstack_quantized_folder_still_loads(tmp_path):
    """Folders written before the GPTQ layout (quant.safetensors + quant_config.json) still load."""
    import yaml
    from llmstack import checkpoint as ckpt
    from llmstack.config import to_dict
    from llmstack.quant.gptq_format import quantized_modules
    cfg, model, report = _quantized(tmp_path, 4)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    ckpt.save_model(model, legacy, "quant.safetensors")
    (legacy / "quant_config.json").write_text(json.dumps(
        {"format_version": 1, "bits": 4, "group_size": 32, "method": "rtn", "act_order": False, "damp": 0.01,
         "modules": list(quantized_modules(model)), "source": ""}))
    (legacy / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    ckpt.write_manifest(legacy)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(load_pretrained(legacy).model(tokens), model(tokens))


def test_unsupported_gptq_settings_are_named():
    ok = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": True}
    assert check_config(ok, "c")["v1"] is True
    for bad, field in [({"bits": 3}, "bits"), ({"checkpoint_format": "marlin"}, "checkpoint_format"),
                       ({"quant_method": "awq"}, "quant_method"), ({"lm_head": True}, "lm_head")]:
        with pytest.raises(GPTQFormatError, match=field):
            check_config({**ok, **bad}, "c")


def test_community_checkpoint_evaluates_generates_and_finetunes(tmp_path):
    """gptqmodel's own checkpoint (desc_act: permuted g_idx) through every llmstack entry point."""
    from llmstack.generate import generate, generate_uncached_greedy
    from tests.test_recipes import recipe_config
    pre = load_pretrained(COMMUNITY)
    assert pre.kind == "quantized" and pre.tokenizer is not None
    assert pre.model.layers[0].attention.wq.in_perm is not None  # desc_act handled as a permutation
    prompt = pre.tokenizer.encode("Alice has 3 apples.")
    assert generate(pre.model, [prompt], max_new_tokens=5).tokens[0] == generate_uncached_greedy(pre.model, prompt, 5)
    from tests.test_hf_data import example_dir
    r = run_cli("eval", "--checkpoint", str(COMMUNITY), "--text-file", str(example_dir() / "eval.txt"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["kind"] == "quantized"

    from llmstack.pretrained import build_model
    cfg = recipe_config("sft", tmp_path)
    cfg.init_from = str(COMMUNITY)
    model = build_model(cfg, torch.device("cpu"), pre.model.ops)
    dense = dense_state_dict(pre.model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k]), k
    x = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(model(x), pre.model(x), atol=1e-5, rtol=1e-5)


# --- the real loader: transformers + optimum + gptqmodel ------------------------------------------

TRANSFORMERS_GPTQ = r"""
import json, sys
from importlib.metadata import version
import torch
from transformers import AutoModelForCausalLM, GPTQConfig
ids_path, out_path, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
ids = torch.load(ids_path)
res, kernels = {}, {}
for folder in folders:
    qc = json.load(open(folder + "/config.json"))["quantization_config"]
    x = ids[folder]
    for backend in ("auto", "torch"):
        kw = {} if backend == "auto" else {"quantization_config": GPTQConfig(bits=qc["bits"], backend="torch")}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu", **kw).eval()
        quant = [(n, m) for n, m in model.named_modules() if hasattr(m, "qweight")]
        kernels[f"{folder}:{backend}"] = type(quant[0][1]).__name__
        with torch.no_grad():
            res[f"{folder}:{backend}"] = model(input_ids=x).logits
    # the loader's own reading of the layout (its unpacking, g_idx, v1 -> v2 zero points), with
    # fp32 scales instead of its fp16 dequantization
    with torch.no_grad():
        for n, m in quant:
            m.scales = m.scales.float()
            w = type(m).dequantize_weight(m).t().float()
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
            parent, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(parent), leaf, lin)
            res[f"{folder}:w:{n}"] = w
        res[f"{folder}:fp32"] = model(input_ids=x).logits
torch.save(res, out_path)
print(json.dumps({"kernels": kernels, **{p: version(p) for p in ("transformers", "optimum", "gptqmodel")}}))
"""


@pytest.mark.slow
def test_transformers_gptqmodel_loads_our_folders_and_we_load_theirs(tmp_path):
    from llmstack.hf import name_map
    from llmstack.quant.gptq_format import quantized_modules
    folders, models = {}, {}
    for bits, method in [(4, "gptq"), (8, "rtn")]:
        cfg, model, report = _quantized(tmp_path / f"{bits}", bits, method, act_order=(bits == 4))
        folders[f"ours{bits}"] = save_quantized(model, cfg, tokenizer=None, out=tmp_path / f"q{bits}", report=report,
                                                dtype="float32")
        models[f"ours{bits}"] = model
    pre = load_pretrained(COMMUNITY)
    folders["community"], models["community"] = COMMUNITY, pre.model
    g = torch.Generator().manual_seed(0)
    ids = {str(f): torch.randint(0, models[k].cfg.vocab_size, (2, 20), generator=g) for k, f in folders.items()}
    torch.save(ids, tmp_path / "ids.pt")
    info = compat_venv.run_script("gptqmodel", TRANSFORMERS_GPTQ, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"),
                                  *ids)
    theirs = torch.load(tmp_path / "out.pt")
    report = {"versions": {k: info[k] for k in ("transformers", "optimum", "gptqmodel")}, "kernels": info["kernels"]}
    for key, folder in folders.items():
        f, model = str(folder), models[key]
        with torch.no_grad():
            ours = model(ids[f])
        hf_names = name_map(model.cfg)
        for name, q in quantized_modules(model).items():  # the same weights, bit for bit
            hf = hf_names[f"{name}.weight"].rpartition(".")[0]
            assert torch.equal(theirs[f"{f}:w:{hf}"], q.dequantized_weight()), (key, name)
        diffs = {b: (theirs[f"{f}:{b}"] - ours).abs().max().item() for b in ("fp32", "torch", "auto")}
        report[key] = diffs
        assert diffs["fp32"] <= 1e-5, (key, diffs)
        # its kernels dequantize to fp16/bf16: the weights round, the logits move by that much
        assert diffs["torch"] <= 2e-3 and diffs["auto"] <= 5e-3, (key, diffs)
    print(json.dumps(report))

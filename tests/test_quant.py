"""Weight-only quantization: RTN formats, GPTQ vs RTN, QuantLinear, save -> load -> same logits,
generation and eval through a quantized checkpoint, the CLI."""
import json

import pytest
import torch
import torch.nn as nn

from llmstack.kernels.dequant_matmul import dequantize_int4, dequantize_int8, unpack_int4
from llmstack.model import Llama
from llmstack.quant import QuantError, load_quantized, quantize_model, save_quantized
from llmstack.quant.gptq import Hessian, gptq_quantize
from llmstack.quant.qlinear import QuantLinear
from llmstack.quant.rtn import quantize_int4, quantize_int8
from tests.helpers import run_cli, tiny_config


def test_int8_rtn_roundtrip():
    w = torch.randn(33, 70)
    t = quantize_int8(w)
    assert t["qweight"].dtype == torch.int8 and t["qweight"].abs().max() <= 127
    deq = dequantize_int8(t["qweight"], t["scales"])
    assert ((deq - w).abs() <= t["scales"][:, None] / 2 + 1e-6).all()  # error <= half a step
    assert torch.equal(quantize_int8(deq)["qweight"], t["qweight"])  # re-quantizing is exact


@pytest.mark.parametrize("K,group", [(128, 32), (100, 32), (7, 32)])
def test_int4_rtn_roundtrip(K, group):
    w = torch.randn(9, K)
    w[0, :min(K, group)] = 0.0  # an all-zero group stays zero
    t = quantize_int4(w, group_size=group)
    assert t["qweight"].shape == (9, (K + 1) // 2) and t["scales"].shape == (9, -(-K // group))
    codes = unpack_int4(t["qweight"], K)
    assert codes.max() <= 15
    deq = dequantize_int4(t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
    step = t["scales"].repeat_interleave(group, 1)[:, :K]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert (deq[0, :min(K, group)] == 0).all()


def _calib(K, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)  # correlated features
    scale = torch.rand(K, generator=g) * 3 + 0.1  # and uneven scales: where GPTQ beats RTN
    return (torch.randn(n, K, generator=g) @ mix) * scale


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False)])
def test_gptq_beats_rtn_on_random_layer(bits, act_order):
    torch.manual_seed(0)
    N, K, group = 64, 256, 64
    w = torch.randn(N, K) * 0.05
    x = _calib(K)
    h = Hessian(K, "cpu")
    for part in x.split(100):
        h.add(part)
    torch.testing.assert_close(h.H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)

    def err(t):
        deq = dequantize_int8(t["qweight"], t["scales"]) if bits == 8 else \
            dequantize_int4(t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
        return float(((x @ (deq - w).t()) ** 2).sum())

    rtn = quantize_int8(w) if bits == 8 else quantize_int4(w, group_size=group)
    gptq = gptq_quantize(w, h.H, bits=bits, group_size=group, act_order=act_order)
    assert err(gptq) < 0.8 * err(rtn), (err(gptq), err(rtn))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantlinear_matches_dequantized_linear(bits):
    lin = nn.Linear(96, 40, bias=True)
    t = quantize_int8(lin.weight) if bits == 8 else quantize_int4(lin.weight, group_size=32)
    q = QuantLinear.from_tensors(t, in_features=96, bits=bits, group_size=32, bias=lin.bias)
    x = torch.randn(3, 5, 96)
    ref = x @ q.dequantized_weight().t() + lin.bias
    torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)
    q.backend = "triton"  # the kernel under the interpreter, through the module
    torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)


def _tiny_model(tmp_path):
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    return cfg, Llama(cfg.model).eval()


@pytest.mark.parametrize("bits,method", [(8, "rtn"), (4, "rtn"), (4, "gptq")])
def test_save_load_same_logits_and_generate(tmp_path, bits, method):
    from llmstack.generate import generate, generate_uncached_greedy
    from llmstack.pretrained import load_pretrained
    cfg, model = _tiny_model(tmp_path)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24))
    full = model(tokens)
    calib = None
    if method == "gptq":
        from llmstack.data import Batch
        calib = [Batch(torch.randint(0, cfg.model.vocab_size, (4, 32)), None) for _ in range(2)]
    report = quantize_model(model, bits=bits, group_size=32, method=method, calib_batches=calib)
    assert report["layers"] == 2 * 7
    assert not any(type(m) is nn.Linear for m in model.layers.modules())
    ql = model(tokens)
    assert (ql - full).abs().max() < (0.05 if bits == 8 else 0.3)
    out = save_quantized(model, cfg, tokenizer=None, out=tmp_path / "q", report=report, dtype="float32")
    pre = load_pretrained(out)
    assert pre.kind == "quantized" and pre.size_bytes == (out / "model.safetensors").stat().st_size
    torch.testing.assert_close(pre.model(tokens), ql, atol=0, rtol=0)
    prompt = tokens[0, :5].tolist()
    assert generate(pre.model, [prompt], max_new_tokens=6).tokens[0] == generate_uncached_greedy(pre.model, prompt, 6)
    tri = load_quantized(out, backend="triton")  # same checkpoint through the Triton kernels (interpreter)
    torch.testing.assert_close(tri.model(tokens[:, :8]), ql[:, :8], atol=1e-4, rtol=1e-4)


def test_bad_options_are_one_line_errors():
    model = Llama(tiny_config("/tmp/unused").model)
    with pytest.raises(QuantError, match="--group-size"):
        quantize_model(model, bits=4, group_size=48)
    with pytest.raises(QuantError, match="calibration"):
        quantize_model(model, bits=4, group_size=32, method="gptq")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from llmstack.train import train
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(out, **{"train.max_steps": 10, "checkpoint.every_steps": 10}))
    return out


@pytest.mark.slow
def test_cli_quantize_eval_generate(trained, tmp_path):
    q = tmp_path / "q4"
    r = run_cli("quantize", "--checkpoint", str(trained), "--bits", "4", "--group-size", "32", "--method", "gptq",
                "--calib-batches", "2", "--out", str(q))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["size_bytes"] < 0.6 * info["source_size_bytes"]  # embedding + head stay fp32
    r = run_cli("eval", "--checkpoint", str(q), "--batches", "1")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["kind"] == "quantized" and ev["val_loss"] > 0 and ev["size_bytes"] == info["size_bytes"]
    r = run_cli("generate", "--checkpoint", str(q), "--prompt", "def ", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    r = run_cli("quantize", "--checkpoint", str(trained), "--bits", "4", "--group-size", "40", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--group-size" in r.stderr


def test_gptq_model_beats_rtn_and_sees_every_layer(tmp_path):
    """Block-sequential GPTQ on a whole model (every linear gets a Hessian, including the fused
    gate/up pair) reconstructs the block outputs better than RTN at the same bits."""
    import copy
    from llmstack.data import Batch
    cfg, model = _tiny_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    calib = [Batch(torch.randint(0, cfg.model.vocab_size, (4, 48), generator=g), None) for _ in range(3)]
    x = torch.cat([b.input for b in calib])
    with torch.no_grad():
        ref = model.hidden_states(x)
        errs = {}
        for method in ("rtn", "gptq"):
            m = copy.deepcopy(model)
            rep = quantize_model(m, bits=4, group_size=32, method=method, calib_batches=calib)
            errs[method] = float(((m.hidden_states(x) - ref) ** 2).mean())
    assert rep["mean_rel_error"] is not None and rep["mean_rel_error"] < 0.1
    assert errs["gptq"] < errs["rtn"], errs

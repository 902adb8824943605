"""Pruning: exact sparsity and N:M pattern of every pruned layer, Wanda's metric by hand, SparseGPT
against a plain column-by-column reference and against magnitude, the `llmstack prune` command
(outputs, bad input), prune -> quantize -> eval, HF export, and the mask kept through recovery
fine-tuning (a step, stale optimizer moments, LoRA, SIGKILL + resume)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmstack import checkpoint as ckpt
from llmstack.calibration import Hessian, InputNorms
from llmstack.cli import main
from llmstack.config import CONFIGS_DIR, load_config
from llmstack.data import Batch
from llmstack.model import Llama
from llmstack.prune import METHODS, MaskKeeper, PruneError, check_options, prune_model, read_masks
from llmstack.prune.algorithms import magnitude_mask, sparsegpt_prune, wanda_mask, wanda_scores
from llmstack.prune.semi_structured import is_2to4, to_semi_structured
from tests.helpers import ROOT, tiny_config, tiny_overrides, train_losses
from tests.test_resume import _last_logged_step

RECIPE = CONFIGS_DIR / "recipes" / "prune_finetune.yaml"


def _tiny_model(tmp_path, seed=0):
    cfg = tiny_config(tmp_path)
    torch.manual_seed(seed)
    return cfg, Llama(cfg.model).eval()


def _calib(vocab, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.randint(0, vocab, (4, 32), generator=g), None) for _ in range(n)]


# --- one matrix ----------------------------------------------------------------------------------

def test_wanda_metric_against_a_hand_computed_example():
    W = torch.tensor([[4.0, -1.0, 3.0, 0.2],
                      [-3.0, 2.0, -0.5, 1.0]])
    X = torch.tensor([[1.0, 3.0, 0.0, 6.0],  # column norms: 1, 5, 2, 10
                      [0.0, 4.0, 2.0, 8.0]])
    stat = InputNorms(4, "cpu")
    stat.add(X[:1])
    stat.add(X[1:])
    torch.testing.assert_close(stat.norms, torch.tensor([1.0, 5.0, 2.0, 10.0]))
    # |W| * ||X_j||: row 0 = 4, 5, 6, 2; row 1 = 3, 10, 1, 10
    torch.testing.assert_close(wanda_scores(W, stat.norms), torch.tensor([[4.0, 5.0, 6.0, 2.0], [3.0, 10.0, 1.0, 10.0]]))
    expected = torch.tensor([[False, True, True, False], [False, True, False, True]])
    assert torch.equal(wanda_mask(W, stat.norms, sparsity=0.5), expected)
    assert torch.equal(wanda_mask(W, stat.norms, sparsity=0.5, pattern=(2, 4)), expected)
    # magnitude alone keeps other weights: the inputs' scale is what Wanda adds
    assert torch.equal(magnitude_mask(W, sparsity=0.5), torch.tensor([[True, False, True, False], [True, True, False, False]]))


def _correlated_inputs(K, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    scale = torch.rand(K, generator=g) * 3 + 0.1
    return (torch.randn(n, K, generator=g) @ mix) * scale


def _sparsegpt_reference(W, H, *, sparsity, pattern, block, damp=0.01):
    """SparseGPT without lazy batching, in float64: every column's error goes straight onto all
    columns to its right; the mask is chosen at the same points (block starts, N:M group starts)."""
    W, H = W.double().clone(), H.double().clone()
    K = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    d = torch.diag(Hinv)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i in range(K):
        if pattern is None and i % block == 0:
            cols = slice(i, min(i + block, K))
            scores = (W[:, cols] ** 2 / d[cols] ** 2).flatten()
            count = int(sparsity * (W.shape[0] * cols.stop)) - int(sparsity * (W.shape[0] * i))
            k = torch.ones_like(scores, dtype=torch.bool)
            k[torch.argsort(scores)[:count]] = False
            keep[:, cols] = k.view(W.shape[0], -1)
        if pattern is not None and i % pattern[1] == 0:
            n, m = pattern
            scores = W[:, i:i + m] ** 2 / d[i:i + m] ** 2
            k = torch.ones_like(scores, dtype=torch.bool)
            k.scatter_(1, torch.argsort(scores, dim=1)[:, : m - n], False)
            keep[:, i:i + m] = k
        q = torch.where(keep[:, i], W[:, i], torch.zeros_like(W[:, i]))
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        W[:, i] = q
    return W, keep


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.3, None), (0.5, (2, 4)), (0.5, (4, 8))])
def test_sparsegpt_matches_the_unblocked_reference(sparsity, pattern):
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    x = _correlated_inputs(64)
    x[:, 5] = 0  # a dead input
    h = Hessian(64, "cpu")
    h.add(x)
    got, keep = sparsegpt_prune(W, h.H, sparsity=sparsity, pattern=pattern, block_size=16)
    ref, ref_keep = _sparsegpt_reference(W, h.H, sparsity=sparsity, pattern=pattern, block=16)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert (got[~keep] == 0).all() and int((~keep).sum()) == int(sparsity * W.numel())


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_on_correlated_inputs(pattern):
    torch.manual_seed(0)
    N, K = 64, 128
    W = torch.randn(N, K) * 0.05
    x = _correlated_inputs(K)
    h = Hessian(K, "cpu")
    h.add(x)
    norms = InputNorms(K, "cpu")
    norms.add(x)

    def err(w):
        return float(((x @ (w - W).t()) ** 2).sum())

    mag = err(W * magnitude_mask(W, sparsity=0.5, pattern=pattern))
    wanda = err(W * wanda_mask(W, norms.norms, sparsity=0.5, pattern=pattern))
    sgpt = err(sparsegpt_prune(W, h.H, sparsity=0.5, pattern=pattern)[0])
    assert sgpt < 0.6 * mag and wanda < mag, (sgpt, wanda, mag)
    assert sgpt < wanda, (sgpt, wanda)


# --- a whole model ---------------------------------------------------------------------------------

CASES = [(m, s, p) for m in METHODS for s, p in [(0.37, None), (None, "2:4"), (0.5, "4:8")]]


@pytest.mark.parametrize("method,sparsity,pattern", CASES)
def test_every_pruned_layer_has_the_exact_sparsity_and_pattern(tmp_path, method, sparsity, pattern):
    cfg, model = _tiny_model(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune_model(model, method=method, sparsity=sparsity, pattern=pattern,
                         calib_batches=_calib(cfg.model.vocab_size))
    params = dict(model.named_parameters())
    linears = [n for n in params if n.startswith("layers.") and n.endswith(("wq.weight", "wk.weight", "wv.weight",
                                                                          "wo.weight", "w1.weight", "w2.weight",
                                                                          "w3.weight"))]
    assert sorted(result.masks) == sorted(linears) and len(linears) == 7 * cfg.model.n_layers
    for name in linears:
        w, keep = params[name], result.masks[name]
        assert keep.dtype == torch.bool and keep.shape == w.shape
        assert (w[~keep] == 0).all(), name
        rows, cols = w.shape
        if pattern:
            n, m = map(int, pattern.split(":"))
            per_group = keep.reshape(rows, cols // m, m).sum(-1)
            assert (per_group == n).all(), name
        elif method == "wanda":  # compared per output row
            assert (keep.sum(1) == cols - int(sparsity * cols)).all(), name
        else:
            assert int((~keep).sum()) == int(sparsity * w.numel()), name
        if method != "sparsegpt":  # only SparseGPT updates the weights it keeps
            assert torch.equal(w[keep], before[name][keep]), name
        rep = next(r for r in result.layers if r["name"] == name)
        assert rep["pruned"] == int((~keep).sum()) and rep["shape"] == [rows, cols]
    for name in set(params) - set(linears):  # embedding, head, norms: untouched by default
        assert torch.equal(params[name], before[name]), name
    s = result.summary()
    assert s["layers"] == len(linears) and 0 < s["sparsity_of_model"] < s["sparsity_of_pruned_layers"]


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_include_embeddings_prunes_head_and_embedding(tmp_path, method):
    cfg, model = _tiny_model(tmp_path)
    result = prune_model(model, method=method, pattern="2:4", calib_batches=_calib(cfg.model.vocab_size),
                         include_embeddings=True)
    for name in ("output.weight", "tok_embeddings.weight"):
        keep = result.masks[name]
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
        assert (dict(model.named_parameters())[name][~keep] == 0).all()


def test_bad_options_are_one_line_errors(tmp_path):
    for args, match in [(("foo", 0.5, None), "--method"), (("wanda", 0.0, None), "--sparsity"),
                        (("wanda", 1.0, None), "--sparsity"), (("wanda", float("nan"), None), "--sparsity"),
                        (("wanda", None, None), "--sparsity: required"), (("wanda", 0.5, "4:4"), "N must"),
                        (("wanda", 0.5, "5:4"), "N must"), (("wanda", 0.5, "0:4"), "N must"),
                        (("wanda", 0.5, "2-4"), "--pattern"), (("wanda", 0.6, "2:4"), "does not match")]:
        with pytest.raises(PruneError, match=match):
            check_options(*args)
    assert check_options("sparsegpt", None, "4:8") == ("sparsegpt", 0.5, (4, 8))
    cfg, model = _tiny_model(tmp_path)
    with pytest.raises(PruneError, match="does not divide the input width 64 of layers.0.attention.wq.weight"):
        prune_model(model, method="magnitude", pattern="1:3")
    with pytest.raises(PruneError, match="calibration"):
        prune_model(model, method="sparsegpt", sparsity=0.5)


def test_semi_structured_swap_refuses_cpu_and_checks_the_pattern(tmp_path):
    cfg, model = _tiny_model(tmp_path)
    prune_model(model, method="magnitude", pattern="2:4")
    assert is_2to4(model.layers[0].attention.wq.weight)
    assert not is_2to4(torch.ones(4, 8)) and not is_2to4(torch.ones(4, 6))
    with pytest.raises(PruneError, match="CUDA"):
        to_semi_structured(model)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse tensor cores need CUDA sm80+")
def test_semi_structured_logits_match_dense_on_cuda():
    from llmstack.config import ModelConfig
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, max_seq_len=128))
    model = model.cuda().to(torch.bfloat16).eval()
    prune_model(model, method="magnitude", pattern="2:4")
    tokens = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        dense = model(tokens)
        report = to_semi_structured(model)
        sparse = model(tokens)
    assert len(report["swapped"]) == 14, report
    torch.testing.assert_close(sparse, dense, atol=5e-2, rtol=5e-2)


# --- the command ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from llmstack.train import train
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(out, **{"train.max_steps": 10, "checkpoint.every_steps": 10}))
    return out


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "sparsegpt_2of4"
    assert main(["prune", "--checkpoint", str(trained), "--method", "sparsegpt", "--sparsity", "0.5",
                 "--pattern", "2:4", "--calib-batches", "2", "--out", str(out)]) == 0
    return out


def test_prune_command_writes_a_normal_checkpoint_with_mask_and_report(pruned, capsys):
    from llmstack.pretrained import load_pretrained
    ckpt.verify(pruned)
    masks = read_masks(pruned)
    report = json.loads((pruned / "prune_report.json").read_text())
    assert report["method"] == "sparsegpt" and report["pattern"] == "2:4" and len(report["per_layer"]) == 14
    assert report["sparsity_of_pruned_layers"] == 0.5 and all(r["rel_error"] < 1 for r in report["per_layer"])
    pre = load_pretrained(pruned)
    params = dict(pre.model.named_parameters())
    assert sorted(masks) == sorted(r["name"] for r in report["per_layer"])
    for name, keep in masks.items():
        assert (params[name][~keep] == 0).all() and is_2to4(params[name])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(pruned), "--batches", "1"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["kind"] == "llmstack" and math.isfinite(ev["val_loss"])


def test_prune_an_hf_folder_with_its_tied_head(tmp_path):
    from llmstack.pretrained import load_pretrained
    from tests.test_hf_parity import save_hf_model
    src = save_hf_model("qwen2", tmp_path / "hf")  # q/k/v biases, tied embeddings
    out = tmp_path / "pruned"
    assert main(["prune", "--checkpoint", str(src), "--method", "magnitude", "--pattern", "4:8",
                 "--include-embeddings", "--out", str(out)]) == 0
    masks = read_masks(out)
    assert "tok_embeddings.weight" in masks and "output.weight" not in masks  # one tensor, one mask
    model = load_pretrained(out).model
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert (params[name][~keep] == 0).all() and (keep.reshape(keep.shape[0], -1, 8).sum(-1) == 4).all()
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)


def _snapshot(*folders) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(trained, pruned, tmp_path, capsys):
    src = str(trained)
    out = str(tmp_path / "new")
    cases = {
        "sparsity 0": (["--method", "wanda", "--sparsity", "0", "--out", out], "--sparsity"),
        "sparsity 1": (["--method", "wanda", "--sparsity", "1", "--out", out], "--sparsity"),
        "sparsity -0.5": (["--method", "wanda", "--sparsity", "-0.5", "--out", out], "--sparsity"),
        "sparsity text": (["--method", "wanda", "--sparsity", "half", "--out", out], "--sparsity"),
        "pattern N = M": (["--method", "wanda", "--pattern", "4:4", "--out", out], "--pattern"),
        "pattern N > M": (["--method", "wanda", "--pattern", "8:4", "--out", out], "--pattern"),
        "pattern M not dividing": (["--method", "wanda", "--pattern", "2:3", "--out", out], "does not divide"),
        "unknown method": (["--method", "obs", "--sparsity", "0.5", "--out", out], "--method"),
        "calib 0": (["--method", "wanda", "--sparsity", "0.5", "--calib-batches", "0", "--out", out], "--calib-batches"),
        "calib -3": (["--method", "sparsegpt", "--sparsity", "0.5", "--calib-batches", "-3", "--out", out],
                     "--calib-batches"),
        "bad device": (["--method", "magnitude", "--sparsity", "0.5", "--device", "gpu0", "--out", out], "--device"),
        "destination exists": (["--method", "magnitude", "--sparsity", "0.5", "--out", str(pruned)], "exists"),
        "destination is a run": (["--method", "magnitude", "--sparsity", "0.5", "--out", src, "--overwrite"],
                                 "training run folder"),
    }
    before = _snapshot(trained, pruned)
    for case, (args, expected) in cases.items():
        capsys.readouterr()
        rc = main(["prune", "--checkpoint", src, *args])
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("llmstack: error:")]
        assert rc == 2 and len(lines) == 1 and expected in lines[0], (case, rc, err)
        assert "Traceback" not in err
        assert not Path(out).exists(), case
    assert _snapshot(trained, pruned) == before, "an existing folder was modified"


def test_prune_then_gptq_int4_keeps_the_zeros_and_evaluates(pruned, tmp_path, capsys):
    from llmstack.pretrained import load_pretrained
    q = tmp_path / "q4"
    assert main(["quantize", "--checkpoint", str(pruned), "--bits", "4", "--group-size", "32", "--method", "gptq",
                 "--calib-batches", "2", "--out", str(q)]) == 0
    masks = read_masks(pruned)
    model = load_pretrained(q).model
    for name, keep in masks.items():
        deq = model.get_submodule(name.rsplit(".", 1)[0]).dequantized_weight()
        assert (deq[~keep] == 0).all(), name
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(q), "--batches", "1"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["kind"] == "quantized" and math.isfinite(ev["val_loss"])


def test_hf_export_of_a_pruned_model_loads_in_transformers_with_the_same_logits(pruned, tmp_path):
    from transformers import AutoModelForCausalLM
    from llmstack.pretrained import load_pretrained
    assert main(["export", "--format", "hf", "--checkpoint", str(pruned), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours = load_pretrained(pruned).model
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-4
    hf_wq = hf.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(hf_wq == 0, ~read_masks(pruned)["layers.0.attention.wq.weight"])


# --- keeping the mask while training --------------------------------------------------------------

def _finetune_cfg(out, pruned, **extra):
    over = tiny_overrides(out, **{"init_from": str(pruned), "train.max_steps": 4, "checkpoint.every_steps": 2,
                                  "train.eval_every": 4, **extra})
    return load_config(RECIPE, over)


def _assert_sparse(folder: Path, masks: dict) -> None:
    state = ckpt.load_tensors(folder / "model.safetensors")
    for name, keep in masks.items():
        if name in state:
            assert (state[name][~keep] == 0).all(), name
    saved = read_masks(folder)
    assert saved is not None and sorted(saved) == sorted(masks)
    assert all(torch.equal(saved[k], masks[k]) for k in masks)


def test_recovery_finetune_keeps_the_mask_and_trains_the_rest(pruned, tmp_path):
    from llmstack.train import train
    masks = read_masks(pruned)
    start = ckpt.load_tensors(pruned / "model.safetensors")
    summary = train(_finetune_cfg(tmp_path / "ft", pruned))
    assert math.isfinite(summary["final_val_loss"])
    last = ckpt.latest_checkpoint(tmp_path / "ft")
    _assert_sparse(last, masks)
    end = ckpt.load_tensors(last / "model.safetensors")
    name = "layers.0.feed_forward.w2.weight"
    assert not torch.equal(end[name][masks[name]], start[name][masks[name]])  # the kept weights trained
    # keep_mask=false: a dense fine-tune of the same checkpoint refills the zeros
    train(_finetune_cfg(tmp_path / "dense", pruned, **{"sparsity.keep_mask": False}))
    dense = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "dense") / "model.safetensors")
    assert (dense[name][~masks[name]] != 0).any()
    assert read_masks(ckpt.latest_checkpoint(tmp_path / "dense")) is None


def test_keeper_zeroes_grads_and_reapplies_the_mask_after_a_step():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4, bias=False)
    keep = torch.rand(4, 8) > 0.5
    keeper = MaskKeeper([("w.weight", lin.weight)], {"w.weight": keep})
    assert (lin.weight[~keep] == 0).all()
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.0)
    lin(torch.randn(3, 8)).sum().backward()
    assert (lin.weight.grad[~keep] == 0).all() and (lin.weight.grad[keep] != 0).all()
    # a stale first moment (say, from dense training) moves pruned weights on its own: the
    # re-application after the step is what keeps them at zero
    opt.step()
    opt.state[lin.weight]["exp_avg"].fill_(1.0)
    opt.zero_grad()
    lin(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert (lin.weight[~keep] != 0).any()
    keeper.apply()
    assert (lin.weight[~keep] == 0).all()
    with pytest.raises(ckpt.CheckpointError, match="not a parameter"):
        keeper.set({"other.weight": keep})


def test_lora_on_a_pruned_base_keeps_the_base_sparse(pruned, tmp_path):
    from llmstack.train import train
    masks = read_masks(pruned)
    out = tmp_path / "lora"
    train(_finetune_cfg(out, pruned, **{"lora.enabled": True, "lora.targets": "[wq, wv, w2]"}))
    last = ckpt.latest_checkpoint(out)
    assert read_masks(last) is not None
    from llmstack.pretrained import build_model
    from llmstack.kernels import resolve_ops
    cfg = _finetune_cfg(out, pruned, **{"lora.enabled": True, "lora.targets": "[wq, wv, w2]"})
    model = build_model(cfg, torch.device("cpu"), resolve_ops("torch", "cpu"))
    ckpt.load_model_state(model, last / "model.safetensors")
    params = dict(model.named_parameters())
    base = params["layers.0.attention.wq.base_layer.weight"]
    assert (base[~masks["layers.0.attention.wq.weight"]] == 0).all()
    assert any(p.abs().sum() > 0 for n, p in params.items() if ".lora_B." in n)  # the adapters trained


@pytest.mark.slow
def test_mask_survives_sigkill_and_resume(pruned, tmp_path):
    steps = 12
    args = tiny_overrides(tmp_path / "x", **{"init_from": str(pruned), "train.max_steps": steps,
                                             "checkpoint.every_steps": 2, "train.eval_every": steps,
                                             "train.deterministic": True})
    ref_args = [a if not a.startswith("out_dir=") else f"out_dir={tmp_path / 'ref'}" for a in args]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "llmstack", "train", "--config", str(RECIPE)]
    done = subprocess.run(cmd + ref_args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen(cmd + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _last_logged_step(tmp_path / "x") < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = ckpt.latest_checkpoint(tmp_path / "x")
    assert latest is not None and int(latest.name.split("_")[1]) < steps, "nothing to resume"
    again = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr
    _assert_sparse(ckpt.latest_checkpoint(tmp_path / "x"), read_masks(pruned))
    assert train_losses(tmp_path / "x") == train_losses(tmp_path / "ref")  # bit for bit

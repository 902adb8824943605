"""ONNX export in the optimum / onnxruntime-genai decoder layout: onnxruntime logits equal torch
logits with and without the cache, greedy decoding through onnxruntime with the cache (left-padded
batches too) and through onnxruntime-genai equals llmstack's `generate` token for token, positions
past the context give one clear error; the CLI (--format hf is checked through transformers in
tests/test_export_hf.py)."""
import json

import numpy as np
import onnx
import pytest
import torch
import yaml

from llmstack.config import to_dict
from llmstack.export import ExportError, OnnxDecoder, check_onnx, export_onnx, onnx_generate
from llmstack.generate import GenerationError, generate
from llmstack.model import Llama
from tests.helpers import run_cli, tiny_config

ort = pytest.importorskip("onnxruntime")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [11, 12], [3, 300, 4]]


def _model(tmp_path, **extra):
    # init_std 0.2: logits far apart enough that greedy ties cannot decide a comparison
    cfg = tiny_config(tmp_path, **{"model.init_std": 0.2, **extra})
    torch.manual_seed(0)
    return Llama(cfg.model).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    model = _model(tmp)
    info = export_onnx(model, tmp / "m.onnx", eos_token_id=0)
    return model, tmp / "m.onnx", info


def test_onnx_layout_is_optimum_and_genai(exported):
    model, path, info = exported
    cfg = model.cfg
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins = {i.name: (i.shape, i.type) for i in sess.get_inputs()}
    outs = {o.name: (o.shape, o.type) for o in sess.get_outputs()}
    past = ["batch_size", cfg.kv_heads, "past_sequence_length", cfg.head_dim]
    total = ["batch_size", cfg.kv_heads, "total_sequence_length", cfg.head_dim]
    want_in = {"input_ids": (["batch_size", "sequence_length"], "tensor(int64)"),
               "attention_mask": (["batch_size", "total_sequence_length"], "tensor(int64)"),
               "position_ids": (["batch_size", "sequence_length"], "tensor(int64)")}
    want_out = {"logits": (["batch_size", "sequence_length", cfg.vocab_size], "tensor(float)")}
    for i in range(cfg.n_layers):
        for kv in ("key", "value"):
            want_in[f"past_key_values.{i}.{kv}"] = (past, "tensor(float)")
            want_out[f"present.{i}.{kv}"] = (total, "tensor(float)")
    assert ins == want_in and outs == want_out
    assert list(ins) == list(want_in)  # optimum feeds by name, but keep the conventional order
    genai = json.loads((path.parent / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == cfg.max_seq_len == info["context_length"]
    assert genai["model"]["decoder"]["filename"] == path.name and genai["model"]["eos_token_id"] == 0
    assert info["files"] == ["m.onnx", "genai_config.json"]


@pytest.mark.parametrize("extra", [{}, {"model.tie_embeddings": True, "model.n_kv_heads": 4}])
def test_onnx_matches_torch_logits(tmp_path, extra):
    model = _model(tmp_path, **extra)
    info = export_onnx(model, tmp_path / "m.onnx")
    assert info["max_abs_diff"] < 1e-4
    # dynamic axes: other batch and sequence sizes than traced, each also split through the cache
    for shape in [(1, 1), (1, 50), (4, 7)]:
        assert check_onnx(tmp_path / "m.onnx", model, torch.randint(0, 512, shape)) < 1e-4


def test_onnx_left_padding_is_masked(exported):
    model, path, _ = exported
    dec = OnnxDecoder(path)
    alone, _ = dec.step(np.array([[11, 12]]), np.ones((1, 2)), np.array([[0, 1]]), dec.empty_cache(1))
    padded, past = dec.step(np.array([[0, 0, 0, 11, 12]]), np.array([[0, 0, 0, 1, 1]]),
                            np.array([[0, 0, 0, 0, 1]]), dec.empty_cache(1))
    assert np.isfinite(padded).all() and np.abs(padded[0, 3:] - alone[0]).max() < 1e-5
    # the padding's cache entries stay masked on the next step
    nxt, _ = dec.step(np.array([[7]]), np.array([[0, 0, 0, 1, 1, 1]]), np.array([[2]]), past)
    ref = model(torch.tensor([[11, 12, 7]]))[0, -1].detach().numpy()
    assert np.abs(nxt[0, -1] - ref).max() < 1e-4


def test_onnx_greedy_with_cache_matches_generate(exported):
    model, path, _ = exported
    ref = generate(model, PROMPTS, max_new_tokens=24).tokens  # one left-padded batch
    assert onnx_generate(path, PROMPTS, max_new_tokens=24) == ref
    assert [onnx_generate(path, [p], max_new_tokens=24)[0] for p in PROMPTS] == ref
    stop = ref[0][5]  # a stop token ends its row only
    assert onnx_generate(path, PROMPTS, max_new_tokens=24, stop_tokens=[stop]) == \
        generate(model, PROMPTS, max_new_tokens=24, stop_tokens=[stop]).tokens


def test_onnxruntime_genai_loads_the_export(exported):
    og = pytest.importorskip("onnxruntime_genai")
    model, path, _ = exported
    genai = og.Model(str(path.parent))
    prompts = [PROMPTS[0], [9, 8, 7, 6, 5, 4, 3]]  # equal lengths: onnxruntime-genai masks no padding
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=7 + 20, do_sample=False, batch_size=2)
    gen = og.Generator(genai, params)
    gen.append_tokens(np.array(prompts, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    got = [[int(t) for t in gen.get_sequence(b)][7:] for b in range(2)]
    want = generate(model, prompts, max_new_tokens=20, stop_tokens=[0]).tokens
    assert got == want
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=model.cfg.max_seq_len + 1)
    with pytest.raises(RuntimeError, match="context_length"):
        og.Generator(genai, params)


def test_onnx_positions_beyond_the_context(tmp_path):
    model = _model(tmp_path)
    for bad in (129, 0):
        with pytest.raises(ExportError, match=rf"--context-length {bad}: must be in \[1, 128\]"):
            export_onnx(model, tmp_path / "long.onnx", context_length=bad)
    assert not list(tmp_path.glob("*.onnx"))
    path = tmp_path / "short.onnx"
    assert export_onnx(model, path, context_length=16)["context_length"] == 16
    with pytest.raises(GenerationError, match="prompt of 7 tokens \\+ max_new_tokens 10 exceeds the context of 16"):
        onnx_generate(path, PROMPTS, max_new_tokens=10)
    assert len(onnx_generate(path, PROMPTS, max_new_tokens=9)[1]) == 9  # 16 positions are fine
    dec = OnnxDecoder(path)
    with pytest.raises(Exception, match="rotary_table_position_ids_must_be_below_16.*out of data bounds"):
        dec.step(np.array([[1, 2]]), np.ones((1, 2)), np.array([[15, 16]]), dec.empty_cache(1))


def test_onnx_external_data_lands_beside_the_file(tmp_path):
    model = _model(tmp_path)
    (tmp_path / "out").mkdir()
    info = export_onnx(model, tmp_path / "out" / "m.onnx", external_data=True)
    assert info["files"] == ["m.onnx", "m.onnx.data", "genai_config.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["genai_config.json", "m.onnx", "m.onnx.data"]
    proto = onnx.load(str(tmp_path / "out" / "m.onnx"), load_external_data=False)
    assert {e.value for i in proto.graph.initializer for e in i.external_data if e.key == "location"} == {"m.onnx.data"}
    assert (tmp_path / "out" / "m.onnx").stat().st_size < 100_000 < (tmp_path / "out" / "m.onnx.data").stat().st_size
    assert check_onnx(tmp_path / "out" / "m.onnx", model, torch.randint(0, 512, (2, 9))) < 1e-4
    with pytest.raises(ExportError, match="genai_config.json: exists"):  # before any work
        export_onnx(model, tmp_path / "out" / "other.onnx")


def _checkpoint(tmp_path):
    from llmstack.checkpoint import save_model, write_manifest
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_model(Llama(cfg.model), folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_manifest(folder)  # as every llmstack save does: unverified folders are refused
    return folder


@pytest.mark.slow
def test_cli_export_onnx(tmp_path):
    folder = _checkpoint(tmp_path)
    r = run_cli("export", "--format", "onnx", "--checkpoint", str(folder), "--out", str(tmp_path / "out.onnx"),
                "--context-length", "64")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["max_abs_diff"] < 1e-4 and info["context_length"] == 64 and (tmp_path / "out.onnx").exists()
    bad = [(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")], "missing"),
           (["--checkpoint", str(folder), "--out", str(tmp_path / "y.onnx"), "--context-length", "129"], "--context-length 129")]
    for args, needle in bad:
        r = run_cli("export", "--format", "onnx", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    r = run_cli("export", "--format", "hf", "--checkpoint", str(folder), "--out", str(tmp_path / "hf2"),
                "--context-length", "64")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--context-length" in r.stderr

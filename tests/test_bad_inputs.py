"""Every class of bad input, for every command that writes (train, quantize, export, convert,
consolidate, distill) and the commands that read: exit status 2, exactly one line naming what is
wrong, and every file that existed before is byte-identical afterwards (hashed).

The older, per-command cases live in test_cli_errors.py; this file covers the classes that can
lose data (destinations, resume pointers, run folders), integrity and confinement, nonsense values
and absurd sizes."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmstack import checkpoint as ckpt
from tests.helpers import run_cli, tiny_overrides

RUNLOCK = ".llmstack.lock"


def snapshot(*folders: Path) -> dict:
    out = {}
    for folder in folders:
        if folder.is_file():
            out[str(folder)] = hashlib.sha256(folder.read_bytes()).hexdigest()
            continue
        for p in sorted(folder.rglob("*")):
            if p.is_file() and "wandb" not in p.parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("llmstack: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def run_in_process(args: list[str], capfd) -> tuple[int, str]:
    """The CLI's own entry point in this process: the same code path as `llmstack ...` without
    paying a Python + torch start-up per case (the subprocess path is covered by test_cli_errors)."""
    from llmstack.cli import main
    capfd.readouterr()
    code = main(list(args))
    return code, capfd.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step run with one checkpoint."""
    out = tmp_path_factory.mktemp("run") / "run"
    res = run_cli("train", *tiny_overrides(out, **{"train.max_steps": 4, "checkpoint.every_steps": 4,
                                                   "train.eval_every": 4}))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _rewrite(folder: Path, mutate) -> None:
    """Change model.safetensors and re-write the manifest, as a buggy tool would."""
    tensors = load_file(str(folder / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "llmstack"})
    ckpt.write_manifest(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, run):
    d = tmp_path_factory.mktemp("inputs")
    step = run / "checkpoints" / "step_4"
    # integrity
    shutil.copytree(step, d / "no_manifest")
    (d / "no_manifest" / "manifest.json").unlink()
    shutil.copytree(step, d / "empty_manifest")
    (d / "empty_manifest" / "manifest.json").write_text('{"files": {}}')
    shutil.copytree(step, d / "malformed_manifest")
    (d / "malformed_manifest" / "manifest.json").write_text('{"files": {"model.safetensors": 12}}')
    shutil.copytree(step, d / "unlisted_tensor")
    save_file({"x": torch.zeros(2)}, str(d / "unlisted_tensor" / "extra.safetensors"))
    shutil.copytree(step, d / "escaping_manifest")
    m = json.loads((d / "escaping_manifest" / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (d / "escaping_manifest" / "manifest.json").write_text(json.dumps(m))
    shutil.copytree(step, d / "nan_weights")
    _rewrite(d / "nan_weights", lambda t: t["layers.0.attention.wq.weight"].__setitem__((0, 0), float("nan")))
    # a run folder whose checkpoints all fail verification and whose pointer is binary
    shutil.copytree(run, d / "all_corrupt")
    (d / "all_corrupt" / RUNLOCK).unlink(missing_ok=True)
    bad = d / "all_corrupt" / "checkpoints" / "step_4" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-7] + b"garbage")
    (d / "all_corrupt" / "checkpoints" / "latest").write_bytes(bytes(range(200, 256)))
    # HF folders: a shard path escaping the folder, a missing config key, an incomplete rope_scaling
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = d / "hf"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(str(hf))
    for name in ("hf_escape", "hf_no_hidden", "hf_rope", "hf_mistyped"):
        shutil.copytree(hf, d / name)
    weights = load_file(str(hf / "model.safetensors"))
    (d / "hf_escape" / "model.safetensors").unlink()
    save_file(weights, str(d / "outside.safetensors"), metadata={"format": "pt"})
    (d / "hf_escape" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in weights}}))
    for name, edit in (("hf_no_hidden", lambda c: c.pop("hidden_size")),
                       ("hf_rope", lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0},
                                                     rope_parameters={"rope_type": "llama3", "factor": 8.0})),
                       ("hf_mistyped", lambda c: c.update(num_hidden_layers="two"))):
        cfg = json.loads((d / name / "config.json").read_text())
        edit(cfg)
        (d / name / "config.json").write_text(json.dumps(cfg))
    # configs
    (d / "dup.yaml").write_text("train:\n  max_steps: 3\ntrain:\n  max_steps: 4\n")
    (d / "self.yaml").write_text("defaults: [self.yaml]\n")
    (d / "defaults_map.yaml").write_text("defaults: {a: 1}\n")
    (d / "a_file").write_text("not a folder\n")
    # corpora: a torn token file, a corrupt meta.json
    from tests.helpers import TEST_DATA_DIR
    src = TEST_DATA_DIR / "bpe512-max120"
    for name in ("torn", "badmeta"):
        shutil.copytree(src, d / name / src.name)
    f = d / "torn" / src.name / "train.bin"
    f.write_bytes(f.read_bytes()[:-1])
    (d / "badmeta" / src.name / "meta.json").write_text("{not json")
    # jsonl records
    (d / "empty.jsonl").write_text("")
    (d / "malformed.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (d / "nonstring.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(50)))
    # an existing output of another kind, and a non-empty folder
    (d / "taken").mkdir()
    (d / "taken" / "notes.txt").write_text("mine\n")
    (d / "model.onnx").write_text("an existing file\n")
    return d


def _train(out, **extra):
    return ["train", *tiny_overrides(out, **extra)]


def _hf_data(d, t, jsonl):
    return {"data.source": "hf", "data.paths": f"[{d / jsonl}]", "data.tokenizer": "hf",
            "data.tokenizer_path": str(d / "hf_tok"), "data.dir": str(t / "cache")}


# case -> (args from (inputs, run, tmp), expected text in the one error line)
CASES = {
    # --- destinations: nothing the user did not name as disposable is replaced ---------------
    "quantize_into_run_folder": (lambda d, r, t: ["quantize", "--checkpoint", str(r), "--bits", "8", "--out", str(r)],
                                 "not empty"),
    "quantize_overwrite_is_not_for_runs": (lambda d, r, t: ["quantize", "--checkpoint", str(r), "--bits", "8",
                                                            "--out", str(r), "--overwrite"], "only replaces"),
    "export_hf_into_checkpoint": (lambda d, r, t: ["export", "--format", "hf", "--checkpoint", str(r),
                                                   "--out", str(r / "checkpoints" / "step_4")], "not empty"),
    "export_onnx_over_a_file": (lambda d, r, t: ["export", "--format", "onnx", "--checkpoint", str(r),
                                                 "--out", str(d / "model.onnx")], "exists"),
    "export_dtype_is_for_hf": (lambda d, r, t: ["export", "--format", "onnx", "--checkpoint", str(r),
                                                "--out", str(t / "m.onnx"), "--dtype", "float16"], "--dtype"),
    "export_model_type_is_for_hf": (lambda d, r, t: ["export", "--format", "peft", "--checkpoint", str(r),
                                                     "--out", str(t / "adapter"), "--model-type", "mistral"],
                                    "--model-type"),
    "export_peft_into_checkpoint": (lambda d, r, t: ["export", "--format", "peft", "--checkpoint", str(r),
                                                     "--out", str(r / "checkpoints" / "step_4")], "not empty"),
    "convert_into_nonempty": (lambda d, r, t: ["convert", "--to", "hf", str(r), str(d / "taken")], "not empty"),
    "consolidate_into_run": (lambda d, r, t: ["checkpoint", "consolidate", str(r), str(r)], "not empty"),
    "train_never_over_checkpoints": (lambda d, r, t: _train(r, **{"train.resume": "never"}), "train.resume=never"),
    "distill_never_over_checkpoints": (lambda d, r, t: ["distill", *tiny_overrides(r, **{
        "train.resume": "never", "distill.teacher": str(r)})], "train.resume=never"),
    "train_out_dir_is_a_file": (lambda d, r, t: _train(d / "a_file"), "out_dir"),
    # --- integrity and confinement -------------------------------------------------------------
    "eval_no_manifest": (lambda d, r, t: ["eval", "--checkpoint", str(d / "no_manifest")], "no manifest.json"),
    "generate_empty_manifest": (lambda d, r, t: ["generate", "--checkpoint", str(d / "empty_manifest"), "--prompt", "x"],
                                "lists no files"),
    "quantize_malformed_manifest": (lambda d, r, t: ["quantize", "--checkpoint", str(d / "malformed_manifest"),
                                                     "--bits", "8", "--out", str(t / "q")], "malformed entry"),
    "convert_unlisted_tensor_file": (lambda d, r, t: ["convert", "--to", "hf", str(d / "unlisted_tensor"), str(t / "h")],
                                     "not in the manifest"),
    "export_manifest_escapes": (lambda d, r, t: ["export", "--format", "hf", "--checkpoint", str(d / "escaping_manifest"),
                                                 "--out", str(t / "e")], "outside"),
    "consolidate_no_manifest": (lambda d, r, t: ["checkpoint", "consolidate", str(d / "no_manifest"), str(t / "c")],
                                "no manifest.json"),
    "train_all_checkpoints_corrupt": (lambda d, r, t: _train(d / "all_corrupt", **{"train.max_steps": 8}),
                                      "refusing to start over"),
    "convert_hf_shard_escapes": (lambda d, r, t: ["convert", "--to", "llmstack", str(d / "hf_escape"), str(t / "x")],
                                 "not a file inside"),
    # --- non-finite weights are never used -------------------------------------------------------
    "eval_nan_weights": (lambda d, r, t: ["eval", "--checkpoint", str(d / "nan_weights")], "NaN or infinite"),
    "generate_nan_weights": (lambda d, r, t: ["generate", "--checkpoint", str(d / "nan_weights"), "--prompt", "x"],
                             "NaN or infinite"),
    "quantize_nan_weights": (lambda d, r, t: ["quantize", "--checkpoint", str(d / "nan_weights"), "--bits", "8",
                                              "--out", str(t / "q2")], "NaN or infinite"),
    "export_nan_weights": (lambda d, r, t: ["export", "--format", "hf", "--checkpoint", str(d / "nan_weights"),
                                            "--out", str(t / "e2")], "NaN or infinite"),
    # --- HF config.json --------------------------------------------------------------------------
    "hf_missing_key": (lambda d, r, t: ["convert", "--to", "llmstack", str(d / "hf_no_hidden"), str(t / "y")],
                       "missing hidden_size"),
    "hf_incomplete_rope_scaling": (lambda d, r, t: ["eval", "--checkpoint", str(d / "hf_rope"), "--text-file",
                                                    str(d / "dup.yaml")], "rope_scaling of type llama3 lacks"),
    "hf_mistyped_key": (lambda d, r, t: ["eval", "--checkpoint", str(d / "hf_mistyped"), "--text-file",
                                         str(d / "dup.yaml")], "num_hidden_layers is 'two'"),
    "eval_hf_folder_without_text": (lambda d, r, t: ["eval", "--checkpoint", str(d / "hf")], "--text-file"),
    # --- config values ---------------------------------------------------------------------------
    "lr_infinite": (lambda d, r, t: ["train", "optim.lr=.inf"], "optim.lr: got inf"),
    "init_std_negative": (lambda d, r, t: ["train", "model.init_std=-0.02"], "model.init_std"),
    "init_std_nan": (lambda d, r, t: ["train", "model.init_std=.nan"], "model.init_std"),
    "eps_negative": (lambda d, r, t: ["train", "optim.eps=-1e-8"], "optim.eps"),
    "dropout_out_of_range": (lambda d, r, t: ["train", "lora.dropout=1.5"], "lora.dropout"),
    "seed_beyond_64_bits": (lambda d, r, t: ["train", "train.seed=18446744073709551617"], "train.seed"),
    "kv_heads_zero": (lambda d, r, t: ["train", "model.n_kv_heads=0"], "model.n_kv_heads"),
    "warmup_beyond_max_steps": (lambda d, r, t: ["train", "train.max_steps=10", "schedule.warmup_steps=20"],
                                "schedule.warmup_steps"),
    "duplicate_yaml_key": (lambda d, r, t: ["train", "--config", str(d / "dup.yaml")], "duplicate key 'train'"),
    "recursive_defaults": (lambda d, r, t: ["train", "--config", str(d / "self.yaml")], "includes itself"),
    "defaults_not_a_list": (lambda d, r, t: ["train", "--config", str(d / "defaults_map.yaml")], "defaults"),
    "dp_not_world_size": (lambda d, r, t: _train(t / "dp", **{"parallel.dp": 2}), "parallel.dp"),
    "missing_deepspeed_config": (lambda d, r, t: ["train", "parallel.deepspeed_config=nope.json"],
                                 "parallel.deepspeed_config"),
    "triton_without_interpreter": (lambda d, r, t: _train(t / "tri", **{"kernels.backend": "triton"}),
                                   "kernels.backend=triton"),
    "distill_bad_temperature": (lambda d, r, t: ["distill", *tiny_overrides(t / "dist", **{
        "distill.teacher": str(r), "distill.temperature": 0})], "distill.temperature"),
    # --- absurd sizes fail fast, before allocating -------------------------------------------------
    "vocab_of_a_billion": (lambda d, r, t: _train(t / "big", **{"model.vocab_size": 10**9}), "needs about"),
    "hundred_thousand_layers": (lambda d, r, t: _train(t / "deep", **{"model.n_layers": 10**5}), "needs about"),
    # --- data ------------------------------------------------------------------------------------
    "torn_token_file": (lambda d, r, t: _train(t / "torn", **{"data.dir": str(d / "torn")}), "not a whole number"),
    "corrupt_corpus_meta": (lambda d, r, t: _train(t / "meta", **{"data.dir": str(d / "badmeta")}), "not valid JSON"),
    "empty_jsonl": (lambda d, r, t: _train(t / "j1", **_hf_data(d, t, "empty.jsonl")), "data.paths"),
    "malformed_jsonl": (lambda d, r, t: _train(t / "j2", **_hf_data(d, t, "malformed.jsonl")), "data.paths"),
    "non_string_text_field": (lambda d, r, t: _train(t / "j3", **_hf_data(d, t, "nonstring.jsonl")), "expected a string"),
    # --- command-line values -----------------------------------------------------------------------
    "generate_negative_max_new_tokens": (lambda d, r, t: ["generate", "--checkpoint", str(r), "--prompt", "x",
                                                          "--max-new-tokens", "-3"], "--max-new-tokens"),
    "generate_temperature_negative": (lambda d, r, t: ["generate", "--checkpoint", str(r), "--prompt", "x",
                                                       "--temperature", "-1"], "--temperature"),
    "generate_temperature_inf": (lambda d, r, t: ["generate", "--checkpoint", str(r), "--prompt", "x",
                                                  "--temperature", "inf"], "--temperature"),
    "generate_temperature_nan": (lambda d, r, t: ["generate", "--checkpoint", str(r), "--prompt", "x",
                                                  "--temperature", "nan"], "--temperature"),
    "generate_top_k_zero": (lambda d, r, t: ["generate", "--checkpoint", str(r), "--prompt", "x", "--top-k", "0"],
                            "--top-k"),
    "generate_top_p_above_one": (lambda d, r, t: ["generate", "--checkpoint", str(r), "--prompt", "x", "--top-p", "1.5"],
                                 "--top-p"),
    "generate_unavailable_device": (lambda d, r, t: ["generate", "--checkpoint", str(r), "--prompt", "x",
                                                     "--device", "cuda:3"], "--device"),
    "quantize_unavailable_device": (lambda d, r, t: ["quantize", "--checkpoint", str(r), "--bits", "8", "--out",
                                                     str(t / "q5"), "--device", "cuda"], "--device"),
    "eval_zero_batches": (lambda d, r, t: ["eval", "--checkpoint", str(r), "--batches", "0"], "--batches"),
    "quantize_damp_zero": (lambda d, r, t: ["quantize", "--checkpoint", str(r), "--bits", "4", "--group-size", "32",
                                            "--method", "gptq", "--damp", "0", "--out", str(t / "q3")], "--damp"),
    "quantize_damp_nan": (lambda d, r, t: ["quantize", "--checkpoint", str(r), "--bits", "4", "--group-size", "32",
                                           "--method", "gptq", "--damp", "nan", "--out", str(t / "q4")], "--damp"),
    "plan_zero_gpus": (lambda d, r, t: ["plan", "--gpus", "0"], "--gpus"),
}


@pytest.fixture(scope="module")
def hf_tokenizer(inputs):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(
        str(inputs / "hf_tok"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, inputs, run, hf_tokenizer, tmp_path, capfd,
                                                         monkeypatch):
    make_args, expected = CASES[case]
    args = make_args(inputs, run, tmp_path)
    before = snapshot(run, inputs)
    if case == "triton_without_interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    line = one_error_line(*run_in_process(args, capfd))
    assert expected in line, line
    assert snapshot(run, inputs) == before, "an existing file was modified"
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "cache")  # a datasets cache may stay
    assert not left, f"a refused command left {left} behind"

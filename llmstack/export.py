"""`llmstack export --format onnx|hf|peft --checkpoint DIR --out PATH`.

ONNX: one decoder graph in the layout optimum and onnxruntime-genai use for decoder-only Llama
models, so the same file runs the prompt (empty past) and each decoding step (one token, the cache
fed back):

  inputs   input_ids       [batch_size, sequence_length]                             int64
           attention_mask  [batch_size, total_sequence_length]  1 = token, 0 = padding  int64
           position_ids    [batch_size, sequence_length]                             int64
           past_key_values.{i}.key|value [batch_size, kv_heads, past_sequence_length, head_dim] fp32
  outputs  logits          [batch_size, sequence_length, vocab]                      fp32
           present.{i}.key|value [batch_size, kv_heads, total_sequence_length, head_dim]  fp32

with total_sequence_length = past_sequence_length + sequence_length (the mask covers the cache and
the new tokens). Padded rows are masked per key; a padding query attends to itself only, so its
unused states stay finite. Position ids must be >= 0 (ONNX Gather wraps negative ones).

Positions beyond the trained length: the rotary tables are baked in for `context_length` positions
(default and at most the model's max_seq_len, checked at export). A later position id is refused by
onnxruntime itself: the lookup nodes are named `rotary_table_position_ids_must_be_below_<N>/<j>`, so
its "indices element out of data bounds" error names the limit. `onnx_generate` checks the length
before running and says so in one line; onnxruntime-genai reads `context_length` from
genai_config.json (written beside the .onnx file so that it loads the folder) and refuses a longer
max_length. The model metadata carries it too (`llmstack.context_length`).

The export is checked with onnxruntime against the torch logits, for a whole batch with an empty
cache and for the same batch split into a prompt and a continuation through the cache; a mismatch
is an error, not a warning. Models over 2 GB keep their weights in one side file `<name>.data`.
Quantized checkpoints are refused: export the full-precision one.

HF: `llmstack.hf.export_hf(model, cfg, tokenizer, out_dir)` (written beside this, in hf.py).
PEFT: `export_peft(checkpoint, out_dir)` below: a LoRA checkpoint as a PEFT adapter folder.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors.torch import save_file

from llmstack import checkpoint as ckpt
from llmstack import jsonio
from llmstack.data import Tokenizer
from llmstack.folders import is_hf_folder, load_config_of
from llmstack.hf import HFConversionError, export_hf, read_hf_config, source_model_type
from llmstack.errors import UserError
from llmstack.generate import GenerationError
from llmstack.kernels import resolve_ops, torch_ops
from llmstack.kernels.rmsnorm import rms_norm_reference, rms_norm_residual_reference
from llmstack.kernels.rope import rope_reference
from llmstack.model import Llama
from llmstack.lora import (PEFT_CONFIG, PEFT_DEFAULTS, PEFT_PREFIX, PEFT_WEIGHTS, adapter_state_dict, hf_module_names,
                           lora_layers)
from llmstack.outputs import atomic_output_dir, atomic_output_file
from llmstack.pretrained import build_model, load_lora_checkpoint, load_pretrained, lora_model_of_checkpoint

log = logging.getLogger("llmstack")
OPSET = 18
CONTEXT_KEY = "llmstack.context_length"
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3  # protobuf's limit for one file


class ExportError(UserError):
    pass


def onnx_ops():
    """The torch op table with norm and rotary ops the exporter can trace: the CPU training path
    uses ATen's fused rms_norm and a rope autograd.Function, which have no ONNX mapping."""
    ops = torch_ops()
    return dataclasses.replace(ops, rms_norm=rms_norm_reference, rope=rope_reference,
                               rms_norm_residual=rms_norm_residual_reference,
                               backends={**ops.backends, "rms_norm": "reference",
                                         "rms_norm_residual": "reference", "rope": "reference"})


def exportable(model) -> Llama:
    """An fp32 CPU copy of `model` running the ONNX-friendly op table."""
    copy = Llama(model.cfg, onnx_ops())
    copy.load_state_dict(model.state_dict())
    return copy.float().eval()


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    cache = [f"{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{c}" for c in cache],
            ["logits"] + [f"present.{c}" for c in cache])


class CachedDecoder(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present): the exported graph."""

    def __init__(self, model, context_length: int):
        super().__init__()
        self.model = exportable(model)
        self.n_rep = model.cfg.n_heads // model.cfg.kv_heads
        # a table of exactly context_length rows: a later position cannot be looked up
        self.register_buffer("cos", self.model.rope_cos[:context_length].clone(), persistent=False)
        self.register_buffer("sin", self.model.rope_sin[:context_length].clone(), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        m, ops = self.model, self.model.ops
        T, S = input_ids.shape[1], attention_mask.shape[1]
        slots = torch.arange(S, device=input_ids.device)
        query_slots = slots[S - T:]  # the new tokens are the last T of the S mask columns
        allowed = (slots[None, :] <= query_slots[:, None])[None] & attention_mask.bool()[:, None, :]
        allowed = (allowed | (slots[None, :] == query_slots[:, None])[None])[:, None]  # [B, 1, T, S]
        x = m.tok_embeddings(input_ids)
        present = []
        for i, layer in enumerate(m.layers):
            y, k, v = self._attention(layer.attention, layer.attention_norm(x, ops), position_ids,
                                      past[2 * i], past[2 * i + 1], allowed)
            present += [k, v]
            x = x + y
            x = x + layer.feed_forward(layer.ffn_norm(x, ops), ops)
        return (m.output(m.norm(x, ops)).float(), *present)

    def _attention(self, attn, x, position_ids, past_k, past_v, allowed):
        B, T, _ = x.shape
        q = attn.wq(x).view(B, T, attn.n_heads, attn.head_dim)
        k = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim)
        v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim)
        q, k = self.model.ops.rope(q, k, self.cos, self.sin, position_ids)
        k = torch.cat([past_k, k.transpose(1, 2)], dim=2)
        v = torch.cat([past_v, v.transpose(1, 2)], dim=2)
        # K/V heads repeated by a static factor: SDPA's enable_gqa is computed from shapes,
        # which tracing turns into tensors
        kr, vr = (k.repeat_interleave(self.n_rep, 1), v.repeat_interleave(self.n_rep, 1)) if self.n_rep > 1 else (k, v)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=allowed)
        return attn.wo(y.transpose(1, 2).reshape(B, T, -1)), k, v


def check_context_length(context_length: int | None, max_seq_len: int) -> int:
    if context_length is None:
        return max_seq_len
    if not 1 <= context_length <= max_seq_len:
        raise ExportError(f"--context-length {context_length}: must be in [1, {max_seq_len}] (the model's "
                          f"max_seq_len: its rotary table has no later positions)")
    return context_length


def export_onnx(model, out: str | Path, *, context_length: int | None = None, eos_token_id: int | None = None,
                check_tokens: torch.Tensor | None = None, atol: float = 1e-4, external_data: bool | None = None,
                overwrite: bool = False) -> dict:
    """Write the cached decoder graph to `out` (+ genai_config.json beside it) and check it."""
    import onnx  # onnx: optional extra, export only
    cfg = model.cfg
    context_length = check_context_length(context_length, cfg.max_seq_len)
    out = Path(out)
    if (out.parent / "genai_config.json").exists() and not overwrite:  # refused before the work, not after
        raise ExportError(f"{out.parent / 'genai_config.json'}: exists (an earlier export in this folder?); "
                          f"choose another folder (or pass --overwrite)")
    decoder = CachedDecoder(model, context_length).eval()
    inputs, outputs = io_names(cfg.n_layers)
    # traced with a non-empty past so every shape on the cache path is symbolic
    B, P, T = 2, 3, 5
    example = (torch.randint(0, cfg.vocab_size, (B, T)), torch.ones(B, P + T, dtype=torch.long),
               torch.arange(P, P + T).expand(B, T).contiguous(),
               *[torch.zeros(B, cfg.kv_heads, P, cfg.head_dim) for _ in range(2 * cfg.n_layers)])
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in inputs[3:]})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in outputs[1:]})
    n_bytes = sum(p.numel() * 4 for p in decoder.parameters())
    if external_data is None:
        external_data = n_bytes >= EXTERNAL_DATA_BYTES
    tokens = check_tokens if check_tokens is not None else torch.randint(0, cfg.vocab_size, (3, min(23, context_length)))
    with atomic_output_file(out, command="export", overwrite=overwrite) as tmp:
        path = tmp / out.name
        # the TorchScript exporter: the dynamo one needs torch.export-able control flow we do not need here
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(decoder, example, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        proto = onnx.load(str(path))  # with any external data the exporter wrote beside it
        onnx.helper.set_model_props(proto, {CONTEXT_KEY: str(context_length), "llmstack.model": "llama"})
        lookups = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[1] == "position_ids"]
        for j, node in enumerate(lookups):  # onnxruntime names the node in its out-of-bounds error
            node.name = f"rotary_table_position_ids_must_be_below_{context_length}/{j}"
        for f in tmp.iterdir():
            if f.name != out.name:
                f.unlink()  # the exporter's one-file-per-tensor data: rewritten as one file below
        onnx.save_model(proto, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                        location=f"{out.name}.data", size_threshold=0)
        (tmp / "genai_config.json").write_text(jsonio.dumps(
            genai_config(cfg, filename=out.name, context_length=context_length, eos_token_id=eos_token_id), indent=2) + "\n")
        diff = check_onnx(path, model, tokens, atol=atol)
    files = [out.name] + ([f"{out.name}.data"] if external_data else []) + ["genai_config.json"]
    return {"out": str(out), "bytes": sum((out.parent / f).stat().st_size for f in files), "files": files,
            "context_length": context_length, "max_abs_diff": diff}


def genai_config(cfg, *, filename: str, context_length: int, eos_token_id: int | None) -> dict:
    """onnxruntime-genai's description of the graph (its names for our inputs and outputs)."""
    # our tokenizers have no BOS; without a tokenizer there is no stop token (an empty list)
    return {
        "model": {
            "type": "llama", "vocab_size": cfg.vocab_size, "context_length": context_length,
            "eos_token_id": [] if eos_token_id is None else eos_token_id,
            "pad_token_id": 0 if eos_token_id is None else eos_token_id,
            "decoder": {
                "filename": filename, "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": cfg.head_dim, "hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": cfg.n_layers, "num_key_value_heads": cfg.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context_length, "min_length": 0,
                   "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "num_return_sequences": 1, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


class OnnxDecoder:
    """An exported graph in onnxruntime: shapes of its cache, its context length, one step."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort  # onnxruntime: optional extra, export only
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONTEXT_KEY not in meta:
            raise ExportError(f"{self.path}: no {CONTEXT_KEY} in the model metadata; not an llmstack ONNX export")
        self.context_length = int(meta[CONTEXT_KEY])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.n_layers = len(past) // 2
        _, self.kv_heads, _, self.head_dim = past[0].shape
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.n_layers)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64)}
        feed.update({f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": t for i, t in enumerate(past)})
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present


def onnx_generate(path: str | Path, prompts: list[list[int]], *, max_new_tokens: int,
                  stop_tokens=()) -> list[list[int]]:
    """Greedy decoding through onnxruntime with the exported cache: left-padded prompts, one prefill,
    then one token per step. New tokens per prompt, the stop token excluded (as `generate`)."""
    dec = OnnxDecoder(path)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > dec.context_length:
        raise GenerationError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the context of "
                              f"{dec.context_length} positions of {dec.path}")
    B = len(prompts)
    ids = np.zeros((B, longest), np.int64)
    mask = np.zeros((B, longest), np.int64)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):], mask[b, longest - len(p):] = p, 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    logits, past = dec.step(ids, mask, positions, dec.empty_cache(B))
    out, done = [[] for _ in range(B)], np.zeros(B, bool)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        for b in np.flatnonzero(~done):
            if int(nxt[b]) in stop_tokens:
                done[b] = True
            else:
                out[b].append(int(nxt[b]))
        if done.all() or i == max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        logits, past = dec.step(nxt[:, None], mask, positions, past)
    return out


def check_onnx(path: Path, model, tokens: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |onnxruntime - torch| over the logits of `tokens`: the whole batch with an empty cache,
    then a prompt and its continuation through the cache, against the original model."""
    dec = OnnxDecoder(path)
    B, T = tokens.shape
    ids = tokens.numpy()
    mask = np.ones((B, T), np.int64)
    positions = np.broadcast_to(np.arange(T), (B, T))
    with torch.no_grad():
        ref = model(tokens).float().numpy()
    whole, _ = dec.step(ids, mask, positions, dec.empty_cache(B))
    diff = float(abs(whole - ref).max())
    if T > 1:
        split = T // 2
        head, past = dec.step(ids[:, :split], mask[:, :split], positions[:, :split], dec.empty_cache(B))
        tail, _ = dec.step(ids[:, split:], mask, positions[:, split:], past)
        diff = max(diff, float(abs(np.concatenate([head, tail], 1) - ref).max()))
    if not diff <= atol * max(1.0, float(abs(ref).max())):
        raise ExportError(f"{path}: onnxruntime logits differ from torch by {diff:.3e} (tolerance {atol:g})")
    return diff


def export_peft(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """A LoRA checkpoint as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads on
    the HF export of its base: the base's HF folder when `init_from` is one, else an HF export of
    the base written to OUT/base."""
    model, cfg, folder = lora_model_of_checkpoint(checkpoint)
    out = Path(out)
    spec = cfg.init_from or ""
    base = Path(spec[3:] if spec.startswith("hf:") else spec) if spec else None
    base_is_hf = base is not None and is_hf_folder(base) and "quantization_config" not in read_hf_config(base)
    hf_names = hf_module_names(cfg.model)
    tensors = {}
    for name, t in adapter_state_dict(model).items():
        module, _, rest = name.partition(".lora_")  # layers.0.attention.wq / A.default.weight
        ab = rest.split(".")[0]
        tensors[f"{PEFT_PREFIX}{hf_names[module]}.lora_{ab}.weight"] = t.float().contiguous()
    c = cfg.lora
    targets = sorted({hf_names[m].rsplit(".", 1)[1] for m in lora_layers(model)})
    with atomic_output_dir(out, command="export", overwrite=overwrite) as tmp:
        if base_is_hf:
            base_path = base.resolve()
        else:  # the base is an llmstack checkpoint or the seeded init: export it beside the adapter
            plain = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=False))
            base_model = build_model(plain, torch.device("cpu"), resolve_ops("auto", "cpu"))
            has_tok = (folder / "tokenizer_info.json").exists()
            export_hf(base_model, cfg, Tokenizer.load(folder) if has_tok else None, tmp / "base")
            base_path = out.resolve() / "base"
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path),
                  "r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "target_modules": targets,
                  "inference_mode": True, **PEFT_DEFAULTS}
        (tmp / PEFT_CONFIG).write_text(jsonio.dumps(config, indent=2))
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    return {"out": str(out), "base_model_name_or_path": str(base_path), "tensors": len(tensors)}


def llmstack_to_hf_folder(src: Path, dst: Path, dtype: str = "float32", model_type: str | None = None, *,
                          overwrite: bool = False) -> Path:
    folder = ckpt.resolve_checkpoint(src)
    if load_config_of(folder).lora.enabled:
        pre = load_lora_checkpoint(folder)
    else:
        pre = load_pretrained(folder)
    if pre.kind == "quantized":
        raise HFConversionError(f"{folder}: quantized checkpoints cannot be exported to HF; export the fp checkpoint")
    return export_hf(pre.model, pre.cfg, pre.tokenizer, dst, model_type=model_type or source_model_type(folder),
                     dtype=dtype, command="convert", overwrite=overwrite)

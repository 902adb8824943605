"""Weight-only quantization of a trained model: `llmstack quantize --checkpoint DIR --bits 8|4
--group-size 128 --method rtn|gptq --out DIR`.

Every nn.Linear inside the transformer blocks becomes a `QuantLinear` (int8 per channel, or int4
groups of `group_size` input columns with scales and zero points). The token embedding and the
LM head stay in full precision: the embedding is a lookup (no matmul to speed up, one row read
per token), and the head is the layer whose error goes straight into the logits; in small-vocab
models like ours it is also a minor share of the weights (and is tied to the embedding when
`model.tie_embeddings`).

A quantized folder is a standard GPTQ checkpoint (`quant/gptq_format.py`): an HF folder with
config.json + quantization_config, model.safetensors (packed int32 qweight/qzeros, fp16 scales,
g_idx, the other tensors in `--dtype`), generation_config.json and the tokenizer, which
transformers (+ optimum/gptqmodel), vLLM and SGLang load; plus config.yaml (the llmstack run
config, so `llmstack eval` scores it on the source's corpus) and a manifest. `load_pretrained`
reads it, and any other GPTQ folder, back into QuantLinear layers. Folders written by earlier
llmstack versions (quant.safetensors + quant_config.json) still load.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from llmstack import jsonio
from llmstack import checkpoint as ckpt
from llmstack.config import to_dict
from llmstack.data import Tokenizer
from llmstack.errors import UserError
from llmstack.folders import Pretrained, load_config_of
from llmstack.kernels import resolve_ops
from llmstack.model import Llama
from llmstack.hf import (DTYPES, check_compatible, expected_shapes, hf_folder_configs, hf_run_config,
                         hf_to_llmstack_state, model_config_from_hf, name_map, read_hf_config, read_hf_tensors,
                         write_hf_folder)
from llmstack.outputs import atomic_output_dir
from llmstack.quant.gptq import gptq_model
from llmstack.quant.gptq_format import (QUANT_FIELDS, check_config, from_gptq, quantization_config,
                                        quantized_modules, read_quantization_config, to_gptq)
from llmstack.quant.qlinear import QuantLinear, resolve_backend
from llmstack.quant.rtn import quantize_rtn

log = logging.getLogger("llmstack")
WEIGHTS_FILE = "model.safetensors"
# the layout written by llmstack before the GPTQ one (still read)
LEGACY_FILE = "quant.safetensors"
LEGACY_CONFIG = "quant_config.json"
LEGACY_VERSION = 1


class QuantError(UserError):
    pass


def check_options(bits: int, group_size: int, method: str) -> None:
    if bits not in (4, 8):
        raise QuantError(f"--bits: got {bits}, allowed: 8, 4")
    if method not in ("rtn", "gptq"):
        raise QuantError(f"--method: got {method!r}, allowed: rtn, gptq")
    if bits == 4 and (group_size <= 0 or group_size % 32):
        raise QuantError(f"--group-size: got {group_size}, must be a positive multiple of 32 (the int4 kernel's K tile)")


def block_linears(model) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, nn.Linear)]


def _replace(model, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def _maker(bits: int, group_size: int, backend: str):
    def make(tensors, linear: nn.Linear) -> QuantLinear:
        # GPTQ files keep biases in fp16: round here so the saved model computes what this one does
        bias = None if linear.bias is None else linear.bias.detach().half().float()
        return QuantLinear.from_tensors(tensors, in_features=linear.in_features, bits=bits, group_size=group_size,
                                        bias=bias, backend=backend)
    return make


@torch.no_grad()
def quantize_model(model, *, bits: int, group_size: int = 128, method: str = "rtn", calib_batches=None,
                   damp: float = 0.01, act_order: bool = False, backend: str = "auto") -> dict:
    """Replace the block linears of `model` (in place) by QuantLinear; returns a small report."""
    check_options(bits, group_size, method)
    device = model.tok_embeddings.weight.device
    chosen = resolve_backend(backend, device)
    make = _maker(bits, group_size, chosen)
    model.eval()
    t0 = time.perf_counter()
    errors = {}
    if method == "rtn":
        for name, lin in block_linears(model):
            _replace(model, name, make(quantize_rtn(lin.weight, bits=bits, group_size=group_size), lin))
    else:
        if not calib_batches:
            raise QuantError("--method gptq needs calibration batches (--calib-batches > 0)")
        errors = gptq_model(model, calib_batches, bits=bits, group_size=group_size, damp=damp, act_order=act_order,
                            make_layer=make)
    return {"bits": bits, "group_size": group_size if bits == 4 else None, "method": method, "backend": chosen,
            "act_order": act_order, "damp": damp, "seconds": time.perf_counter() - t0,
            "layers": len(block_linears_quant(model)),
            "mean_rel_error": (sum(errors.values()) / len(errors)) if errors else None}


def block_linears_quant(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def save_quantized(model, cfg, *, tokenizer, out: str | Path, report: dict, dtype: str = "float16",
                   overwrite: bool = False) -> Path:
    """Write the quantized model as a GPTQ folder, atomically (temp folder, manifest, rename) and
    never over other data. `dtype`: the unquantized tensors (embedding, norms, LM head)."""
    out = Path(out)
    qmods = quantized_modules(model)
    state = model.state_dict()
    tensors = {}
    for ours, theirs in name_map(cfg.model).items():
        module, _, leaf = ours.rpartition(".")
        if module not in qmods:
            tensors[theirs] = state[ours].detach().to("cpu", DTYPES[dtype]).contiguous()
        elif leaf == "weight":  # the layer's bias travels with its GPTQ tensors
            prefix = theirs.rpartition(".")[0]
            tensors.update({f"{prefix}.{k}": v for k, v in to_gptq(qmods[module]).items()})
    hf_cfg, gen_cfg = hf_folder_configs(cfg.model, tokenizer, dtype=dtype)
    qc = quantization_config(bits=report["bits"], group_size=report["group_size"], act_order=report["act_order"],
                             damp=report["damp"])
    qc["meta"]["method"] = report["method"]
    hf_cfg["quantization_config"] = qc
    with atomic_output_dir(out, command="quantize", overwrite=overwrite) as tmp:
        write_hf_folder(tmp, hf_cfg=hf_cfg, gen_cfg=gen_cfg, tensors=tensors, tokenizer=tokenizer,
                        context=cfg.model.max_seq_len)
        (tmp / "quantize_config.json").write_text(jsonio.dumps(qc, indent=2))  # what AutoGPTQ-era loaders read
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def _model_shell(mcfg, device: torch.device, backend: str):
    chosen = resolve_backend(backend, device)
    # backend=triton on CPU (the interpreter) is for the quantized kernels; the other ops stay torch there
    ops_backend = "auto" if (backend == "triton" and device.type == "cpu") else backend
    return Llama(mcfg, resolve_ops(ops_backend, device.type)), chosen


def load_quantized(folder: str | Path, device="cpu", backend: str = "auto"):
    """A GPTQ folder (ours or another quantizer's) or a legacy llmstack quantized folder as a
    ready model (`Pretrained`, kind "quantized")."""
    folder = Path(folder)
    # our own outputs (legacy layout, or GPTQ with the source's config.yaml) always carry a manifest
    if (folder / LEGACY_CONFIG).is_file() or (folder / "config.yaml").is_file() or (folder / ckpt.MANIFEST).exists():
        ckpt.verify(folder)
    if (folder / LEGACY_CONFIG).is_file():
        return _load_legacy(folder, device, backend)
    where = str(folder / "config.json")
    hf = read_hf_config(folder)
    settings = check_config(hf.get("quantization_config") or {}, where)
    mcfg = model_config_from_hf(hf, where)
    if (folder / "config.yaml").is_file():  # written by llmstack quantize: the source's run config
        cfg = load_config_of(folder)
        check_compatible(cfg.model, mcfg, where)
    else:
        cfg = hf_run_config(folder, mcfg)
    device = torch.device(device)
    model, chosen = _model_shell(mcfg, device, backend)
    tensors = read_hf_tensors(folder)
    names = name_map(mcfg)
    quantized = {}
    for ours, theirs in names.items():
        module, _, leaf = ours.rpartition(".")
        prefix = theirs.rpartition(".")[0]
        if leaf == "weight" and f"{prefix}.qweight" in tensors:
            quantized[module] = prefix
    for module, prefix in quantized.items():
        lin = model.get_submodule(module)
        layer = {f: tensors.pop(f"{prefix}.{f}") for f in (*QUANT_FIELDS, "bias") if f"{prefix}.{f}" in tensors}
        q = from_gptq(layer, in_features=lin.in_features, backend=chosen, where=prefix, **settings)
        if q.out_features != lin.out_features:
            raise QuantError(f"{folder}: {prefix} has {q.out_features} outputs, the config implies {lin.out_features}")
        _replace(model, module, q)
    plain = {o: t for o, t in names.items() if o.rpartition(".")[0] not in quantized}
    state = hf_to_llmstack_state(tensors, mcfg, str(folder), expected_shapes(mcfg), names=plain)
    missing = model.load_state_dict(state, strict=False).missing_keys
    missing = [k for k in missing if k.rpartition(".")[0] not in quantized and not (mcfg.tie_embeddings and k == "output.weight")]
    if missing:
        raise QuantError(f"{folder}: no tensor for {missing[0]}")
    has_tok = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    tok = Tokenizer("hf", folder) if has_tok else None
    return Pretrained(model.to(device).eval(), cfg, tok, folder, "quantized")


def _load_legacy(folder: Path, device, backend: str):
    ckpt.verify(folder)
    qcfg = ckpt.read_json(folder / LEGACY_CONFIG)
    if qcfg.get("format_version") != LEGACY_VERSION:
        raise QuantError(f"{folder / LEGACY_CONFIG}: format_version {qcfg.get('format_version')}, this llmstack reads "
                         f"{LEGACY_VERSION}")
    cfg = load_config_of(folder)
    device = torch.device(device)
    model, chosen = _model_shell(cfg.model, device, backend)
    bits, group = qcfg["bits"], qcfg["group_size"] or 0
    for name in qcfg["modules"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise QuantError(f"{folder / LEGACY_CONFIG}: module {name} is not in this model config") from None
        _replace(model, name, QuantLinear(lin.in_features, lin.out_features, bits=bits, group_size=group,
                                          bias=lin.bias is not None, backend=chosen))
    ckpt.load_model_state(model, folder / LEGACY_FILE)
    has_tok = (folder / "tokenizer_info.json").exists() or (folder / "tokenizer.json").exists()
    tok = Tokenizer.load(folder) if has_tok else None
    return Pretrained(model.to(device).eval(), cfg, tok, folder, "quantized")


@torch.no_grad()
def dense_state_dict(model) -> dict[str, torch.Tensor]:
    """The state of the full-precision model equal to a quantized one (QuantLinear -> weight),
    to fine-tune from a quantized checkpoint."""
    state = {k: v for k, v in model.state_dict().items()}
    for name, q in quantized_modules(model).items():
        for k in [k for k in state if k.startswith(f"{name}.")]:
            del state[k]
        state[f"{name}.weight"] = q.dequantized_weight()
        if q.bias is not None:
            state[f"{name}.bias"] = q.bias.detach().float()
    return state


def is_quantized_folder(folder: Path) -> bool:
    return (Path(folder) / LEGACY_CONFIG).is_file() or read_quantization_config(folder) is not None

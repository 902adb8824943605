"""Weight-only quantization of a trained model: `llmstack quantize --checkpoint DIR --bits 8|4
--group-size 128 --method rtn|gptq --out DIR`.

Every nn.Linear inside the transformer blocks becomes a `QuantLinear` (int8 per channel, or int4
groups of `group_size` input columns with scales and zero points). The token embedding and the
LM head stay in full precision: the embedding is a lookup (no matmul to speed up, one row read
per token), and the head is the layer whose error goes straight into the logits; in small-vocab
models like ours it is also a minor share of the weights (and is tied to the embedding when
`model.tie_embeddings`).

A quantized folder holds quant.safetensors (quantized buffers + full-precision tensors),
quant_config.json, config.yaml and the tokenizer files of the source, and a manifest; so
`llmstack eval`, `llmstack generate` and `load_pretrained` work on it unchanged.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from llmstack.outputs import atomic_output_dir, check_destination
from llmstack.calibration import calibration_batches
from llmstack import checkpoint as ckpt
from llmstack.errors import UserError
from llmstack.quant.qlinear import QuantLinear, resolve_backend
from llmstack.quant.rtn import quantize_rtn

log = logging.getLogger("llmstack")
QUANT_FILE = "quant.safetensors"
QUANT_CONFIG = "quant_config.json"
FORMAT_VERSION = 1


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
        return QuantLinear.from_tensors(tensors, in_features=linear.in_features, bits=bits, group_size=group_size,
                                        bias=linear.bias, backend=backend)
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
            _replace(model, name, make(quantize_rtn(lin.weight, bits, group_size), lin))
    else:
        if not calib_batches:
            raise QuantError("--method gptq needs calibration batches (--calib-batches > 0)")
        from llmstack.quant.gptq import gptq_model
        errors = gptq_model(model, calib_batches, bits=bits, group_size=group_size, damp=damp, act_order=act_order,
                            make_layer=make)
    return {"bits": bits, "group_size": group_size if bits == 4 else None, "method": method, "backend": chosen,
            "act_order": act_order, "damp": damp, "seconds": time.perf_counter() - t0,
            "layers": len(block_linears_quant(model)),
            "mean_rel_error": (sum(errors.values()) / len(errors)) if errors else None}


def block_linears_quant(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def save_quantized(model, cfg, tokenizer, out: str | Path, report: dict, *, source: str = "",
                   overwrite: bool = False) -> Path:
    """Write the quantized folder atomically (temp folder, manifest, rename); never over other data."""
    from llmstack.config import to_dict
    out = Path(out)
    with atomic_output_dir(out, command="quantize", overwrite=overwrite) as tmp:
        ckpt.save_model(model, tmp, QUANT_FILE)
        qcfg = {"format_version": FORMAT_VERSION, "bits": report["bits"], "group_size": report["group_size"],
                "method": report["method"], "act_order": report["act_order"], "damp": report["damp"],
                "modules": block_linears_quant(model), "source": str(source)}
        (tmp / QUANT_CONFIG).write_text(json.dumps(qcfg, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out


def load_quantized(folder: str | Path, device="cpu", backend: str = "auto"):
    from llmstack.data import Tokenizer
    from llmstack.kernels import resolve_ops
    from llmstack.model import Llama
    from llmstack.pretrained import Pretrained, load_config_of
    folder = Path(folder)
    ckpt.verify(folder)
    qcfg = ckpt.read_json(folder / QUANT_CONFIG)
    if qcfg.get("format_version") != FORMAT_VERSION:
        raise QuantError(f"{folder / QUANT_CONFIG}: format_version {qcfg.get('format_version')}, this llmstack reads "
                         f"{FORMAT_VERSION}")
    cfg = load_config_of(folder)
    device = torch.device(device)
    chosen = resolve_backend(backend, device)
    # backend=triton on CPU (the interpreter) is for the quantized kernels; the other ops stay torch there
    ops_backend = "auto" if (backend == "triton" and device.type == "cpu") else backend
    model = Llama(cfg.model, resolve_ops(ops_backend, device.type))
    bits, group = qcfg["bits"], qcfg["group_size"] or 0
    for name in qcfg["modules"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise QuantError(f"{folder / QUANT_CONFIG}: module {name} is not in this model config") from None
        _replace(model, name, QuantLinear(lin.in_features, lin.out_features, bits=bits, group_size=group,
                                          bias=lin.bias is not None, backend=chosen))
    ckpt.load_model_state(model, folder / QUANT_FILE)
    has_tok = (folder / "tokenizer_info.json").exists() or (folder / "tokenizer.json").exists()
    tok = Tokenizer.load(folder) if has_tok else None
    return Pretrained(model.to(device).eval(), cfg, tok, folder, "quantized")


def quantize_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmstack quantize", description="Weight-only int8/int4 quantization.")
    p.add_argument("--checkpoint", required=True, help="llmstack checkpoint/run folder or HF folder")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, default=128, help="int4: input columns per scale/zero point")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--out", required=True, help="new output folder (refused if it exists and is not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of llmstack quantize at --out")
    p.add_argument("--calib-batches", type=int, default=16, help="GPTQ: training batches for the Hessians")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: diagonal damping, fraction of mean(diag H)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    check_options(args.bits, args.group_size, args.method)
    check_destination(args.out, command="quantize", overwrite=args.overwrite)
    from llmstack.pretrained import load_pretrained
    pre = load_pretrained(args.checkpoint, device=args.device)
    if pre.kind == "quantized":
        raise QuantError(f"{pre.folder}: already quantized; quantize the full-precision checkpoint")
    calib = calibration_batches(pre.cfg, args.calib_batches) if args.method == "gptq" else None
    report = quantize_model(pre.model, bits=args.bits, group_size=args.group_size, method=args.method,
                            calib_batches=calib, damp=args.damp, act_order=args.act_order)
    out = save_quantized(pre.model, pre.cfg, pre.tokenizer, args.out, report, source=str(pre.folder),
                         overwrite=args.overwrite)
    size = (out / QUANT_FILE).stat().st_size
    print(json.dumps({**report, "out": str(out), "size_bytes": size, "source_size_bytes": pre.size_bytes}))
    return 0

"""`llmstack export --format onnx|hf --checkpoint DIR --out PATH`.

ONNX: the full-precision model as a graph from token ids [batch, seq] (int64, both axes dynamic)
to fp32 logits [batch, seq, vocab], exported with the torch ops (plain torch: SDPA, rotary
tables, RMSNorm), then checked with onnxruntime against the torch logits on a token batch; a
mismatch is an error, not a warning. Quantized checkpoints are refused: export the
full-precision one.

HF: `llmstack.hf.export_hf(model, cfg, tokenizer, out_dir)` (written beside this, in hf.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from llmstack.errors import UserError
from llmstack.outputs import atomic_output_file, check_destination

log = logging.getLogger("llmstack")
OPSET = 18


class ExportError(UserError):
    pass


class _Logits(nn.Module):
    """tokens -> fp32 logits (no targets, no cache): the one graph we export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens)


def onnx_ops(n_rep: int):
    """The torch op table with an attention the tracer can export: K/V heads repeated by a static
    factor (SDPA's enable_gqa flag is computed from shapes, which tracing turns into tensors)."""
    import dataclasses

    import torch.nn.functional as F

    from llmstack.kernels import torch_ops

    def attention(q, k, v, *, causal=True, scale=None, doc_ids=None):
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if n_rep > 1:
            kh, vh = kh.repeat_interleave(n_rep, dim=1), vh.repeat_interleave(n_rep, dim=1)
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale).transpose(1, 2)

    from llmstack.kernels.rmsnorm import rms_norm_reference, rms_norm_residual_reference
    from llmstack.kernels.rope import rope_reference

    # The CPU training path uses ATen's fused rms_norm and a rope autograd.Function; neither has
    # an ONNX mapping, so the export traces the plain elementwise references instead.
    ops = torch_ops()
    return dataclasses.replace(ops, attention=attention, rms_norm=rms_norm_reference, rope=rope_reference,
                               rms_norm_residual=rms_norm_residual_reference,
                               backends={**ops.backends, "attention": "torch-onnx", "rms_norm": "reference",
                                         "rms_norm_residual": "reference", "rope": "reference"})


def exportable(model):
    """An fp32 CPU copy of `model` running the ONNX-friendly op table."""
    from llmstack.model import Llama
    cfg = model.cfg
    copy = Llama(cfg, onnx_ops(cfg.n_heads // cfg.kv_heads))
    copy.load_state_dict(model.state_dict())
    return copy.float().eval()


def export_onnx(model, out: str | Path, *, vocab_size: int, check_tokens: torch.Tensor | None = None,
                atol: float = 1e-4, overwrite: bool = False) -> dict:
    out = Path(out)
    wrapper = _Logits(exportable(model)).eval()
    example = torch.randint(0, vocab_size, (2, 16))
    tokens = check_tokens if check_tokens is not None else torch.randint(0, vocab_size, (3, 23))
    with atomic_output_file(out, command="export", overwrite=overwrite) as tmp:
        # the TorchScript exporter: the dynamo one needs torch.export-able control flow we do not need here
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapper, (example,), str(tmp / out.name), input_names=["tokens"], output_names=["logits"],
                              dynamic_axes={"tokens": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                              opset_version=OPSET, dynamo=False)
        diff = check_onnx(tmp / out.name, model, tokens, atol=atol)
    return {"out": str(out), "bytes": out.stat().st_size, "max_abs_diff": diff}


def check_onnx(path: Path, model, tokens: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |onnxruntime - torch| over the logits of `tokens`, against the original model."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"tokens": tokens.numpy().astype("int64")})
    with torch.no_grad():
        ref = model(tokens).numpy()
    diff = float(abs(got - ref).max())
    if not diff <= atol * max(1.0, float(abs(ref).max())):
        raise ExportError(f"{path}: onnxruntime logits differ from torch by {diff:.3e} (tolerance {atol:g})")
    return diff


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmstack export", description="Export a checkpoint to ONNX or HF format.")
    p.add_argument("--format", choices=["onnx", "hf"], required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="ONNX: a new .onnx file path; hf: a new output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of llmstack export at --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.format == "onnx" and out.suffix != ".onnx":
        raise ExportError(f"--out {out}: an ONNX export is a file ending in .onnx")
    check_destination(out, command="export", overwrite=args.overwrite, is_file=args.format == "onnx")
    from llmstack.pretrained import load_pretrained
    pre = load_pretrained(args.checkpoint, device="cpu", backend="torch")
    if pre.kind == "quantized":
        raise ExportError(f"{pre.folder}: quantized checkpoints are not exported; export the full-precision source "
                          f"and quantize in the target runtime")
    if args.format == "hf":
        from llmstack.hf import export_hf
        export_hf(pre.model, pre.cfg, pre.tokenizer, out, overwrite=args.overwrite)
        print(json.dumps({"format": "hf", "out": args.out}))
        return 0
    info = export_onnx(pre.model, out, vocab_size=pre.cfg.model.vocab_size, overwrite=args.overwrite)
    print(json.dumps({"format": "onnx", **info}))
    return 0

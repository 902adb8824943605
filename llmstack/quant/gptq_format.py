"""The standard GPTQ checkpoint layout: what `llmstack quantize` writes and what transformers
(+ optimum/gptqmodel), vLLM, SGLang and exllama read; read back here so a community GPTQ
checkpoint can be evaluated, generated from and fine-tuned with llmstack.

A GPTQ folder is an HF model folder (config.json, model.safetensors, tokenizer, generation config)
whose config.json has `quantization_config` {quant_method: "gptq", bits, group_size, desc_act,
sym, checkpoint_format, ...}. Each quantized linear (K inputs, N outputs, b bits, pf = 32 / b
codes per int32 word) is stored under its HF module name as
- `qweight` int32 [K / pf, N]: the code of input row k sits in word k // pf at bit b * (k % pf);
- `qzeros`  int32 [groups, N / pf]: zero points packed the same way along N, stored as zero - 1
  (checkpoint_format "gptq", the v1 layout every loader reads) or as the zero itself ("gptq_v2");
- `scales`  fp16 [groups, N]; `g_idx` int32 [K]: the group of each input row; `bias` fp16 [N].
W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).

llmstack's QuantLinear formats map exactly (no re-rounding: `quant/rtn.py` keeps scales in fp16
and int4 zero points in 1..15, which v1 can hold):
- int4 asymmetric groups of G (sym false): codes, zeros and scales as they are, g_idx = k // G;
- int8 symmetric per channel (sym true, group_size -1): code = q + 128, zero 128.
Reading also takes 4-bit desc_act checkpoints (g_idx from a column permutation: the rows are
sorted by group and QuantLinear permutes its input the same way) and gptq_v2 zeros. What
llmstack's kernels cannot run (2/3-bit, grouped or asymmetric 8-bit, a quantized lm_head) is one
error naming the field.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from llmstack.errors import UserError
from llmstack.kernels.dequant_matmul import pack_int4, unpack_int4
from llmstack.quant.qlinear import QuantLinear

QUANT_FIELDS = ("qweight", "qzeros", "scales", "g_idx")
FORMATS = ("gptq", "gptq_v2")


class GPTQFormatError(UserError):
    pass


# --- bit packing (int32 words, low bits first) --------------------------------------------------

def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [K, N] (0 .. 2^bits - 1) -> int32 [K * bits / 32, N], packed along K."""
    pf = 32 // bits
    K, N = codes.shape
    words = codes.to(torch.int64).reshape(K // pf, pf, N)
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    packed = (words << shifts).sum(dim=1)  # disjoint bit fields: the sum is the bitwise or
    return _as_int32(packed)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    pf = 32 // bits
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    return ((words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, packed.shape[1])


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] -> int32 [G, N * bits / 32], packed along N."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits).t()


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


# --- QuantLinear <-> GPTQ tensors ---------------------------------------------------------------

def quantization_config(*, bits: int, group_size: int | None, act_order: bool, damp: float) -> dict:
    """The `quantization_config` of a folder written by llmstack (GPTQConfig's fields)."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size if bits == 4 else -1,
            "desc_act": False, "sym": bits == 8, "static_groups": act_order, "true_sequential": True,
            "damp_percent": damp, "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False,
            "meta": {"quantizer": ["llmstack"], "act_order": act_order}}


def to_gptq(q: QuantLinear) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one QuantLinear (exact: same codes, scales and zero points)."""
    K, N, bits = q.in_features, q.out_features, q.bits
    pf = 32 // bits
    if K % pf or N % pf:
        raise GPTQFormatError(f"GPTQ layout: {bits}-bit layers need in/out features divisible by {pf}, "
                              f"got {K} x {N}")
    if q.in_perm is not None:
        raise GPTQFormatError("GPTQ layout: writing a layer with an input permutation (desc_act) is not supported")
    if bits == 8:
        codes = (q.qweight.to(torch.int16) + 128).t()
        zeros = torch.full((1, N), 128, dtype=torch.int64)
        scales = q.scales.view(1, N)
        g_idx = torch.zeros(K, dtype=torch.int32)
    else:
        codes = unpack_int4(q.qweight, K).t()
        zeros = q.zeros.to(torch.int64).t()
        scales = q.scales.t()
        g_idx = (torch.arange(K) // q.group_size).to(torch.int32)
    if (zeros < 1).any():
        raise GPTQFormatError("GPTQ layout: a zero point of 0 cannot be stored in the v1 layout (zero - 1)")
    half = scales.half()
    if not torch.equal(half.float(), scales.float()):
        raise GPTQFormatError("GPTQ layout: scales are not fp16 values; quantize with this llmstack version")
    out = {"qweight": pack_rows(codes.cpu(), bits), "qzeros": pack_cols((zeros - 1).cpu(), bits),
           "scales": half.cpu().contiguous(), "g_idx": g_idx}
    if q.bias is not None:
        out["bias"] = q.bias.detach().half().cpu()
    return out


def check_config(qc: dict, where: str) -> dict:
    """Validated reading settings of a `quantization_config`: bits, group_size, v1 (bool)."""
    if qc.get("quant_method") != "gptq":
        raise GPTQFormatError(f"{where}: quantization_config.quant_method {qc.get('quant_method')!r} is not "
                              f"supported (llmstack reads gptq)")
    bits = qc.get("bits")
    if bits not in (4, 8):
        raise GPTQFormatError(f"{where}: quantization_config.bits {bits} is not supported (llmstack runs 4 and 8)")
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in FORMATS:
        raise GPTQFormatError(f"{where}: quantization_config.checkpoint_format {fmt!r} is not supported "
                              f"(allowed: {', '.join(FORMATS)})")
    if qc.get("pack_dtype", "int32") != "int32":
        raise GPTQFormatError(f"{where}: quantization_config.pack_dtype {qc['pack_dtype']!r} is not supported (int32)")
    if qc.get("lm_head"):
        raise GPTQFormatError(f"{where}: quantization_config.lm_head=true (a quantized LM head) is not supported")
    return {"bits": bits, "group_size": int(qc.get("group_size", -1)), "v1": fmt == "gptq", "sym": bool(qc.get("sym"))}


def from_gptq(t: dict[str, torch.Tensor], *, in_features: int, bits: int, group_size: int, v1: bool,
              sym: bool = False, backend: str = "torch", where: str = "") -> QuantLinear:
    """A QuantLinear holding exactly the weights of one GPTQ layer."""
    K = in_features
    for f in ("qweight", "qzeros", "scales"):
        if f not in t:
            raise GPTQFormatError(f"{where}: missing tensor {where}.{f}")
    N = t["scales"].shape[1]
    pf = 32 // bits
    if t["qweight"].shape != (K // pf, N) or K % pf:
        raise GPTQFormatError(f"{where}.qweight: shape {tuple(t['qweight'].shape)}, expected {(K // pf, N)}")
    codes = unpack_rows(t["qweight"], bits)  # [K, N]
    zeros = unpack_cols(t["qzeros"], bits)[:, :N]  # [groups, N]
    mid = 2 ** (bits - 1)
    # symmetric files hold one zero point; some quantizers label v2 zeros (mid, not mid - 1) as v1
    if v1 and not (sym and bool((zeros == mid).all())):
        zeros = zeros + 1
    scales = t["scales"].float()
    G = group_size if group_size > 0 else K
    n_groups = scales.shape[0]
    g_idx = t["g_idx"].long() if "g_idx" in t else torch.arange(K) // G
    if g_idx.shape != (K,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise GPTQFormatError(f"{where}.g_idx: not a group index per input row for {n_groups} groups")
    perm = None
    if not torch.equal(g_idx, torch.arange(K) // G):  # desc_act: sort rows by group
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(K) // G):
            raise GPTQFormatError(f"{where}.g_idx: groups are not {G} rows each; llmstack cannot run this layout")
        codes = codes[perm]
    bias = t.get("bias")
    if bits == 8:
        if n_groups != 1 or not bool((zeros == 128).all()):
            raise GPTQFormatError(f"{where}: 8-bit GPTQ with groups or asymmetric zero points is not supported "
                                  f"(llmstack's int8 kernel is symmetric per channel)")
        tensors = {"qweight": (codes.t() - 128).to(torch.int8).contiguous(), "scales": scales[0].contiguous()}
    else:
        if int(zeros.max()) > 15:
            raise GPTQFormatError(f"{where}.qzeros: zero point {int(zeros.max())} outside 0..15 (a v1 file "
                                  f"written with zero 0; re-save it as gptq_v2)")
        tensors = {"qweight": pack_int4(codes.t().to(torch.uint8)), "scales": scales.t().contiguous(),
                   "zeros": zeros.t().to(torch.uint8).contiguous()}
    q = QuantLinear.from_tensors(tensors, in_features=K, bits=bits, group_size=G,
                                 bias=None if bias is None else bias.float(), backend=backend)
    if perm is not None:
        q.set_input_permutation(perm)
    return q


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def read_quantization_config(folder: Path) -> dict | None:
    """config.json's quantization_config, or None (not a quantized HF folder)."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None

"""Pruning a whole model, and writing the pruned checkpoint.

`prune_model(model, method=..., sparsity=..., pattern=...)` prunes, in place, every nn.Linear
inside the transformer blocks (and, with `include_embeddings`, the LM head and the token
embedding) and returns the masks with a per-layer report. Wanda and SparseGPT calibrate block by
block (`llmstack/calibration.py`): block i is pruned on the outputs of the already pruned blocks
0..i-1, as in both papers. The embedding is a lookup with no input activations to weigh, so it
is pruned by magnitude whatever the method; the head (tied or not) gets the method itself, on
the final norm's outputs.

`save_pruned` writes a normal llmstack checkpoint (dense weights with zeros, config.yaml,
tokenizer, manifest) plus the mask (`sparsity_mask.safetensors`) and `prune_report.json`.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from llmstack import jsonio
from llmstack import checkpoint as ckpt
from llmstack.calibration import Hessian, InputNorms, reconstruction_error, run_blockwise
from llmstack.config import to_dict
from llmstack.errors import UserError
from llmstack.outputs import atomic_output_dir
from llmstack.prune.algorithms import Pattern, magnitude_mask, sparsegpt_prune, wanda_mask
from llmstack.prune.masks import write_masks

METHODS = ("magnitude", "wanda", "sparsegpt")
REPORT_FILE = "prune_report.json"


class PruneError(UserError):
    pass


def parse_pattern(text: str | None) -> Pattern | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m:
        raise PruneError(f"--pattern: got {text!r}, expected N:M such as 2:4 or 4:8")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= n < mm:
        raise PruneError(f"--pattern {text}: N must be at least 1 and below M (N:M keeps N of every M weights)")
    return n, mm


def check_options(method: str, sparsity: float | None, pattern: str | Pattern | None, *, damp: float = 0.01,
                  block_size: int = 128) -> tuple[str, float, Pattern | None]:
    """(method, sparsity, pattern) validated; with a pattern the sparsity is 1 - N/M."""
    if method not in METHODS:
        raise PruneError(f"--method: got {method!r}, allowed: {', '.join(METHODS)}")
    if sparsity is not None and not (math.isfinite(sparsity) and 0 < sparsity < 1):
        raise PruneError(f"--sparsity: got {sparsity}, must be in (0, 1)")
    nm = parse_pattern(pattern if pattern is None or isinstance(pattern, str) else f"{pattern[0]}:{pattern[1]}")
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise PruneError(f"--sparsity: {sparsity} does not match --pattern {nm[0]}:{nm[1]}, which prunes "
                             f"{implied:g} of the weights (leave --sparsity out or make them agree)")
        sparsity = implied
    if sparsity is None:
        raise PruneError("--sparsity: required without --pattern (the fraction of weights to remove, in (0, 1))")
    if not (math.isfinite(damp) and damp > 0):
        raise PruneError(f"--damp: got {damp}, must be > 0")
    if block_size <= 0:
        raise PruneError(f"--block-size: got {block_size}, must be > 0")
    return method, float(sparsity), nm


def prune_targets(model, include_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """{parameter name: weight} of what gets pruned (tied embeddings: one tensor, one name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(m.weight)]: m.weight for m in model.layers.modules() if isinstance(m, nn.Linear)}
    if include_embeddings:
        for w in (model.output.weight, model.tok_embeddings.weight):
            out.setdefault(names[id(w)], w)
    return out


def check_pattern_fits(targets: dict[str, torch.Tensor], pattern: Pattern | None) -> None:
    if pattern is None:
        return
    for name, w in targets.items():
        if w.shape[1] % pattern[1]:
            raise PruneError(f"--pattern {pattern[0]}:{pattern[1]}: M={pattern[1]} does not divide the input width "
                             f"{w.shape[1]} of {name}")


@dataclass
class PruneResult:
    method: str
    sparsity: float
    pattern: Pattern | None
    calib_batches: int
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)  # name, shape, pruned, sparsity, rel_error
    seconds: float = 0.0
    model_params: int = 0

    def summary(self) -> dict:
        pruned = sum(r["pruned"] for r in self.layers)
        total = sum(r["shape"][0] * r["shape"][1] for r in self.layers)
        errors = [r["rel_error"] for r in self.layers if r["rel_error"] is not None]
        return {"method": self.method, "sparsity": self.sparsity,
                "pattern": f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else None,
                "calib_batches": self.calib_batches, "layers": len(self.layers), "pruned_weights": pruned,
                "sparsity_of_pruned_layers": pruned / max(total, 1), "sparsity_of_model": pruned / max(self.model_params, 1),
                "mean_rel_error": sum(errors) / len(errors) if errors else None, "seconds": self.seconds}


@torch.no_grad()
def prune_model(model, *, method: str, sparsity: float | None = None, pattern: str | Pattern | None = None,
                calib_batches: list | None = None, include_embeddings: bool = False, damp: float = 0.01,
                block_size: int = 128) -> PruneResult:
    """Prune `model` in place (see the module doc); the masks are True where a weight is kept."""
    method, sparsity, nm = check_options(method, sparsity, pattern, damp=damp, block_size=block_size)
    targets = prune_targets(model, include_embeddings)
    check_pattern_fits(targets, nm)
    if method != "magnitude" and not calib_batches:
        raise PruneError(f"--method {method} needs calibration batches (--calib-batches > 0)")
    model.eval()
    names = {id(p): n for n, p in model.named_parameters()}
    result = PruneResult(method, sparsity, nm, len(calib_batches or []) if method != "magnitude" else 0,
                         model_params=model.num_params())
    t0 = time.perf_counter()

    def prune(weight: torch.Tensor, how: str, stat=None) -> None:
        rel_error = None
        if how == "magnitude":
            keep = magnitude_mask(weight, sparsity=sparsity, pattern=nm)
        elif how == "wanda":
            keep = wanda_mask(weight, stat.norms, sparsity=sparsity, pattern=nm)
        else:
            new, keep = sparsegpt_prune(weight, stat.H, sparsity=sparsity, pattern=nm, damp=damp, block_size=block_size)
            rel_error = reconstruction_error(weight, new, stat.H)
            weight.copy_(new)
        weight.mul_(keep.to(weight.device))
        name = names[id(weight)]
        result.masks[name] = keep.cpu()
        pruned = int((~keep).sum())
        result.layers.append({"name": name, "shape": list(weight.shape), "pruned": pruned,
                              "sparsity": pruned / weight.numel(), "rel_error": rel_error})

    if method == "magnitude":
        for w in targets.values():
            prune(w, "magnitude")
    else:
        device = model.tok_embeddings.weight.device
        stat_cls = InputNorms if method == "wanda" else Hessian

        def process(li, block, linears, stats):
            for n, lin in linears.items():
                prune(lin.weight, method, stats[n])

        xs = run_blockwise(model, calib_batches, make_stat=lambda lin: stat_cls(lin.in_features, device),
                           process_block=process, what=f"prune ({method})")
        if include_embeddings:
            stat = stat_cls(model.output.weight.shape[1], device)
            for x in xs:
                stat.add(model.norm(x, model.ops))
            prune(model.output.weight, method, stat)
            if names[id(model.tok_embeddings.weight)] not in result.masks:  # untied: a lookup table
                prune(model.tok_embeddings.weight, "magnitude")
    result.seconds = time.perf_counter() - t0
    return result


def save_pruned(model, cfg, tokenizer, out: str | Path, result: PruneResult, *, source: str = "",
                overwrite: bool = False) -> Path:
    """The pruned model as an llmstack checkpoint folder, written atomically (never over other data)."""
    raw = to_dict(cfg)
    raw["lora"]["enabled"] = False  # the weights are full (adapters of a LoRA source are merged)
    out = Path(out)
    with atomic_output_dir(out, command="prune", overwrite=overwrite) as tmp:
        ckpt.save_model(model, tmp)
        write_masks(result.masks, tmp)
        report = {**result.summary(), "source": str(source), "per_layer": result.layers}
        (tmp / REPORT_FILE).write_text(jsonio.dumps(report, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out

"""Loss and perplexity of any checkpoint (llmstack, HF folder, quantized) on the validation split
of its own data, or on a user's text file tokenized with the checkpoint's own tokenizer."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from llmstack.data import DataError, build_data, eval_batches
from llmstack.folders import Pretrained


@torch.no_grad()
def _loss_over_windows(model, ids: list[int], context: int, device) -> tuple[float, int]:
    """Sum of token losses over non-overlapping context-length windows of ids (a short text is one window)."""
    total, count = 0.0, 0
    for start in range(0, max(len(ids) - 1, 1), context):
        chunk = ids[start: start + context + 1]
        if len(chunk) < 2:
            break
        x = torch.tensor([chunk[:-1]], device=device)
        y = torch.tensor([chunk[1:]], device=device)
        total += float(model(x, y, reduction="sum"))
        count += y.numel()
    return total, count


def eval_text_file(pre: Pretrained, text_file: str | Path) -> dict:
    path = Path(text_file)
    if not path.is_file():
        raise DataError(f"--text-file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--text-file {path}: not UTF-8 text") from None
    if pre.tokenizer is None:
        raise DataError(f"{pre.folder}: checkpoint has no tokenizer to read {path}")
    ids = pre.tokenizer.encode(text)
    if len(ids) < 2:
        raise DataError(f"--text-file {path}: needs at least 2 tokens, got {len(ids)}")
    device = next(pre.model.parameters()).device
    total, count = _loss_over_windows(pre.model, ids, pre.cfg.model.max_seq_len, device)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count}


@torch.no_grad()
def eval_validation(pre: Pretrained, n_batches: int | None = None) -> dict:
    cfg = pre.cfg
    if n_batches is not None and n_batches < 1:
        raise DataError(f"--batches: got {n_batches}, must be >= 1")
    if pre.kind == "hf":
        raise DataError(f"{pre.folder}: a Hugging Face folder names no training corpus; pass --text-file FILE "
                        "to score a text, or evaluate the llmstack checkpoint it was exported from")
    data = build_data(cfg)
    device = next(pre.model.parameters()).device
    total, count = 0.0, 0
    for b in eval_batches(data.val, n_batches or cfg.train.eval_batches):
        b = b.to(device)
        total += float(pre.model(b.input, b.target, position_ids=b.position_ids, doc_ids=b.doc_ids, reduction="sum"))
        count += b.n_targets
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "tokens": count}

"""The one chunked driver behind every fused "hidden states x vocabulary matrix -> loss" op: the
linear + cross-entropy (cross_entropy.py), the distillation loss (kd_loss.py) and the
vocabulary-parallel cross-entropy (parallel/tensor_parallel.py).

None of them holds the [N, V] logits. Per chunk of tokens the driver
  1. computes the chunk's logits into one reused [chunk, V] buffer, in the GEMM's compute dtype
     (bf16 stays bf16: no fp32 copy of the logits),
  2. calls the op's `step(logits, lo, hi)`, which computes the loss in fp32 and overwrites the
     logits in place with d loss / d logits (already scaled),
  3. grad_h[lo:hi] = dlogits @ W, written in place,
  4. grad_W += dlogits.T @ h[lo:hi], accumulated in place in an fp32 [V, D] buffer: `addmm_` for
     fp32, cuBLAS's fp32-output bf16/fp16 GEMM (`out_dtype`) on CUDA, and on CPU (which has no
     such GEMM) slabs of rows of W, so no [V, D] low-precision temporary is ever made.
The gradients are therefore ready when the forward returns; the autograd Function keeps them and
its backward only multiplies them, in place, by grad_output.

Chunks are sized by a memory budget for one chunk of logits (`loss_chunk_tokens`): on a GPU
1k-2k tokens at a 128k vocabulary, enough rows for each GEMM to be compute-bound (one pass over W
per GEMM costs V x D reads for chunk x V x D multiply-adds) while the buffer stays a fraction of
grad_W; on a CPU a smaller budget (see LOGITS_BUDGET_BYTES).

Targets are bounds-checked here (`check_targets`): a target outside [0, V) that is not the
ignore index is a one-line error naming the first bad value, never an out-of-bounds read.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from llmstack.errors import UserError

# bytes of one chunk of logits (in the dtype they are stored in), per device type. GPU: enough
# rows that each GEMM re-reading W is compute-bound (1,024 fp32 / 2,048 bf16 rows at a 128,256
# vocabulary). A CPU's GEMM is compute-bound at a few hundred rows already and a smaller chunk
# stays nearer its caches: 64 MiB (512 fp32 rows at a 32k vocabulary) measured fastest on the
# development machine, with 4-8x less memory than the GPU budget (BENCHMARKS.md, Kernels).
LOGITS_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 64, 8192
# elements of an fp32 temporary a torch step or a CPU slab may hold at once (32 MiB)
TEMP_ELEMENTS = 8 * 2**20


class TargetOutOfRange(UserError):
    pass


def loss_chunk_tokens(vocab: int, itemsize: int = 4, device_type: str = "cuda") -> int:
    """Tokens per chunk: the largest power of two whose [tokens, vocab] logits fit the device
    type's budget (other accelerators use the GPU one), within [MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS]."""
    budget = LOGITS_BUDGET_BYTES.get(device_type, LOGITS_BUDGET_BYTES["cuda"])
    fit = max(1, budget // max(1, vocab * itemsize))
    tokens = 1 << (fit.bit_length() - 1)
    return max(MIN_CHUNK_TOKENS, min(MAX_CHUNK_TOKENS, tokens))


def compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs (and so the logits) use: autocast's if it is on, else the promoted one."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int, what: str) -> None:
    """Every target is in [0, vocab) or equals ignore_index (one reduction and one host read)."""
    if is_fake(targets):  # shapes only (the compile gate's FakeTensorMode): no values to check
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{what}: a target is outside [0, {vocab}) and is not ignore_index")
        return
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise TargetOutOfRange(f"{what}: target id {first} is outside the vocabulary [0, {vocab}) and is not "
                               f"ignore_index={ignore_index} ({int(bad.sum())} such targets); check that the data's "
                               f"tokenizer matches model.vocab_size")


def row_blocks(rows: int, cols: int, temporaries: int = 1):
    """(start, end) row ranges such that `temporaries` fp32 blocks fit TEMP_ELEMENTS (>= 1 row)."""
    step = max(1, TEMP_ELEMENTS // (temporaries * max(1, cols)))
    for r in range(0, rows, step):
        yield r, min(r + step, rows)


def _has_out_dtype_addmm(t: torch.Tensor) -> bool:
    # aten::addmm.dtype_out (torch >= 2.8) exists for CUDA only; a CPU build has no fake kernel
    # for it (the compile gate's fake CUDA tensors take the slab loop, shapes only)
    return t.is_cuda and not is_fake(t)


def accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool = False) -> None:
    """acc (fp32) += a @ b in place (first: acc = a @ b, so acc needs no zero fill), with a/b in any
    one dtype, and no acc-sized temporary."""
    if a.dtype == acc.dtype:
        torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
    elif _has_out_dtype_addmm(acc):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, beta=0.0 if first else 1.0, out=acc)
    else:
        for r0, r1 in row_blocks(acc.shape[0], acc.shape[1]):
            part = torch.mm(a[r0:r1], b)
            acc[r0:r1].copy_(part) if first else acc[r0:r1].add_(part)


# step(logits [c, V] in the compute dtype, lo, hi) -> fp32 0-d loss of the chunk; it overwrites the
# logits with d loss / d logits
Step = Callable[[torch.Tensor, int, int], torch.Tensor]


def chunked_linear_loss(h: torch.Tensor, weight: torch.Tensor, step: Step, *, chunk_tokens: int,
                        need_grad_h: bool, need_grad_w: bool, grad_h_dtype: torch.dtype | None = None):
    """(loss, grad_h or None, grad_W or None): the loop described in the module docstring.
    h [N, D], weight [V, D]; chunk_tokens <= 0 picks `loss_chunk_tokens`. grad_h is in
    grad_h_dtype (default h's dtype), grad_W in fp32."""
    N, D = h.shape
    V = weight.shape[0]
    dev = h.device
    cdt = compute_dtype(h, weight)
    if chunk_tokens <= 0:
        chunk_tokens = loss_chunk_tokens(V, torch.empty((), dtype=cdt).element_size(), dev.type)
    grad_h = torch.empty((N, D), dtype=grad_h_dtype or h.dtype, device=dev) if need_grad_h else None
    grad_w = torch.empty((V, D), dtype=torch.float32, device=dev) if need_grad_w else None
    total = torch.zeros((), dtype=torch.float32, device=dev)
    if N == 0:
        return total, grad_h, grad_w.zero_() if need_grad_w else None
    with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
        w_c = weight.to(cdt)
        buf = torch.empty((min(chunk_tokens, N), V), dtype=cdt, device=dev)
        for lo in range(0, N, chunk_tokens):
            hi = min(lo + chunk_tokens, N)
            h_c = h[lo:hi].to(cdt)
            logits = buf[: hi - lo]
            torch.mm(h_c, w_c.t(), out=logits)
            total += step(logits, lo, hi)
            if need_grad_h:
                if grad_h.dtype == cdt:
                    torch.mm(logits, w_c, out=grad_h[lo:hi])
                else:
                    grad_h[lo:hi] = torch.mm(logits, w_c)
            if need_grad_w:
                accumulate_mm_(grad_w, logits.t(), h_c, first=lo == 0)
    return total, grad_h, grad_w


class _GradsFromForward(torch.autograd.Function):
    """loss = run(need_grad_h, need_grad_w)[0]; the backward scales the gradients `run` returned."""

    @staticmethod
    def forward(ctx, h, weight, run):
        loss, grad_h, grad_w = run(ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_out.to(torch.float32)
        # in place: the stored gradients are used once (a second backward trips autograd's
        # saved-tensor version check), so no second [V, D] buffer is made here
        dh = grad_h.mul_(g).to(ctx.dtypes[0]) if grad_h is not None else None
        dw = grad_w.mul_(g).to(ctx.dtypes[1]) if grad_w is not None else None
        return dh, dw, None


def apply_chunked_loss(h: torch.Tensor, weight: torch.Tensor, run) -> torch.Tensor:
    """Run `run(need_grad_h, need_grad_w) -> (loss, grad_h, grad_w)` under autograd when h or
    weight needs a gradient, else directly (no graph, no gradient buffers)."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _GradsFromForward.apply(h, weight, run)
    return run(False, False)[0]

"""Pruning on a trained model, end to end: val perplexity of magnitude / Wanda / SparseGPT at 50%
unstructured, 2:4 and 4:8, before and after a short recovery fine-tune, and each method's wall time.

1. Train bench_inference's "medium" teacher (dim 256 x 6 layers, ~6.5M params) on the default
   corpus, or take an existing run with --teacher.
2. Prune it nine ways (`prune_model`, blocks only; 16 calibration batches of the train split,
   the same batches for Wanda and SparseGPT), evaluate, write each as a pruned checkpoint; also
   at --also-sparsity (default 70%) unstructured, without recovery, where the methods separate more.
3. Recovery: `configs/recipes/prune_finetune.yaml` from each pruned checkpoint (mask kept), and the
   dense teacher fine-tuned the same way as the baseline for "how much is just more training".

Targets: Wanda and SparseGPT each lose at most a third of what magnitude loses at 50%
unstructured; 2:4 after recovery within +10% of the dense perplexity.

    python scripts/bench_prune.py [--teacher RUN] [--teacher-steps 600] [--recovery-steps 100] [--write]
    python scripts/bench_prune.py --semi-structured [--write]   # CUDA: 2:4 sparse vs dense prefill/decode

--write puts the table between <!-- bench_prune --> markers (<!-- bench_prune:gpu --> for the
CUDA comparison) in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llmstack.config import CONFIGS_DIR, load_config  # noqa: E402
from scripts.bench_inference import TEACHERS, common, decode_tok_s  # noqa: E402
from scripts.bench_kernels import write_section  # noqa: E402

MARKS = ("<!-- bench_prune -->", "<!-- /bench_prune -->")
GPU_MARKS = ("<!-- bench_prune:gpu -->", "<!-- /bench_prune:gpu -->")
RECIPE = CONFIGS_DIR / "recipes" / "prune_finetune.yaml"
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = (("50%", 0.5, None), ("2:4", None, "2:4"), ("4:8", None, "4:8"))
N_EVAL = 8


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50))


def header(command: str, what: str, wall_s: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return (f"Command: `{command}` — git {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {what} "
            f"(load average {' '.join(load)} at the end). Total {wall_s / 60:.1f} min.")


def recover(init: Path, out: Path, args) -> tuple[float, float]:
    """Recovery fine-tune of `init` with the recipe (mask kept when init has one): (val loss, wall s).
    The trainer's final eval runs on the same N_EVAL validation batches as `eval_validation`."""
    from llmstack.train import train
    over = common(out, args.recovery_steps) + TEACHERS["medium"] + [f"init_from={init}", f"optim.lr={args.recovery_lr}"]
    summary = train(load_config(RECIPE, over))
    return summary["final_val_loss"], summary["wall_s"]


def run(args) -> dict:
    from llmstack.calibration import calibration_batches
    from llmstack.eval import eval_validation
    from llmstack.pretrained import load_pretrained
    from llmstack.prune import prune_model, save_pruned
    from llmstack.train import train

    out = Path(args.out)
    t0 = time.perf_counter()
    res = {"recovery_steps": args.recovery_steps, "recovery_lr": args.recovery_lr, "calib_batches": args.calib_batches,
           "threads": torch.get_num_threads(), "teacher_train_s": None}
    if args.teacher:
        teacher = Path(args.teacher)
        summary = json.loads((teacher / "summary.json").read_text())
        res["teacher_steps"], res["teacher_train_s"] = summary["steps"], summary["wall_s"]
    else:
        teacher = out / "teacher"
        cfg = load_config(CONFIGS_DIR / "tiny.yaml", common(teacher, args.teacher_steps) + TEACHERS["medium"]
                          + ["optim.lr=3e-3"])
        res["teacher_train_s"] = train(cfg)["wall_s"]
        res["teacher_steps"] = args.teacher_steps
    dense = load_pretrained(teacher)
    res["params"] = dense.model.num_params()
    res["dense_loss"] = eval_validation(dense, N_EVAL)["val_loss"]
    res["dense_ft_loss"], res["dense_ft_s"] = recover(teacher, out / "ft_dense", args)
    same = eval_validation(load_pretrained(out / "ft_dense"), N_EVAL)["val_loss"]
    assert abs(same - res["dense_ft_loss"]) < 1e-4, (same, res["dense_ft_loss"])  # the trainer's val = ours
    print(json.dumps({k: res[k] for k in ("params", "dense_loss", "dense_ft_loss")}), flush=True)
    calib = calibration_batches(dense.cfg, args.calib_batches)
    rows = []
    extra = [(f"{s * 100:g}%", s, None) for s in args.also_sparsity]
    for method in METHODS:
        for label, sparsity, pattern in PATTERNS + tuple(extra):
            pre = load_pretrained(teacher)
            result = prune_model(pre.model, method=method, sparsity=sparsity, pattern=pattern, calib_batches=calib)
            name = f"{method}_{label.replace('%', 'pct').replace(':', 'of')}"
            save_pruned(pre.model, pre.cfg, pre.tokenizer, out / name, result, source=str(teacher), overwrite=True)
            loss = eval_validation(pre, N_EVAL)["val_loss"]
            recovered = (label, sparsity, pattern) in PATTERNS
            ft_loss, ft_s = recover(out / name, out / f"ft_{name}", args) if recovered else (None, None)
            rows.append({"method": method, "pattern": label, "prune_s": result.seconds, "loss": loss,
                         "ft_loss": ft_loss, "ft_s": ft_s,
                         "sparsity": result.summary()["sparsity_of_pruned_layers"]})
            print(json.dumps(rows[-1]), flush=True)
    res["rows"] = rows
    res["wall_s"] = time.perf_counter() - t0
    return res


def table(res: dict, command: str) -> str:
    d, dft = ppl(res["dense_loss"]), ppl(res["dense_ft_loss"])
    by = {(r["method"], r["pattern"]): r for r in res["rows"]}
    lines = [header(command, "**a 2-core CPU shared with other jobs**, no GPU", res["wall_s"]), "",
             f"Model: bench_inference's medium teacher (dim 256, 6 layers, {res['params'] / 1e6:.2f}M params) trained "
             f"{res['teacher_steps']} steps on the default corpus (stdlib BPE-4096, seq 128, batch 8, lr 3e-3 cosine"
             + (f"; {res['teacher_train_s'] / 60:.1f} min here" if res["teacher_train_s"] else "") + "). "
             f"Pruned: every linear of the blocks (embedding and LM head dense); Wanda/SparseGPT calibrated on "
             f"{res['calib_batches']} train batches of 8 x 128 tokens. Recovery: `configs/recipes/prune_finetune.yaml`, "
             f"{res['recovery_steps']} steps at lr {res['recovery_lr']:g} with the mask kept. Val = {N_EVAL} batches "
             f"x 8 x 128 tokens. **Dense: ppl {d:.2f}; dense fine-tuned the same {res['recovery_steps']} steps: "
             f"{dft:.2f}** (the part of any recovery that is just more training). {res['threads']} torch thread(s).", "",
             "| method | sparsity | prune wall | val ppl | vs dense | after recovery | vs dense | vs dense + same FT | "
             "recovery wall |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        p = ppl(r["loss"])
        after = "| - | - | - | - |"
        if r["ft_loss"] is not None:
            q = ppl(r["ft_loss"])
            after = f"| {q:.2f} | {(q / d - 1) * 100:+.1f}% | {(q / dft - 1) * 100:+.1f}% | {r['ft_s']:.0f} s |"
        lines.append(f"| {r['method']} | {r['pattern']} | {r['prune_s']:.1f} s | {p:.2f} | {(p / d - 1) * 100:+.1f}% "
                     + after)
    if any(r["ft_loss"] is None for r in res["rows"]):
        lines += ["", "Rows without recovery columns are extra sparsities, pruned and evaluated only."]
    mag = ppl(by[("magnitude", "50%")]["loss"]) - d
    lines += ["", "Targets:", ""]
    for m in ("wanda", "sparsegpt"):
        lost = ppl(by[(m, "50%")]["loss"]) - d
        share = f"{lost / mag:.2f} of it" if mag > 0 else "magnitude lost nothing"
        lines.append(f"- {m} at 50% unstructured loses {lost:+.2f} ppl vs magnitude's {mag:+.2f} "
                     f"({share}; target <= 0.33): **{'met' if mag > 0 and lost <= mag / 3 else 'missed'}**")
    for m in METHODS:
        q = ppl(by[(m, "2:4")]["ft_loss"])
        lines.append(f"- {m} 2:4 after recovery: ppl {q:.2f}, {(q / d - 1) * 100:+.1f}% vs dense (target <= +10%): "
                     f"**{'met' if q <= 1.1 * d else 'missed'}**; {(q / dft - 1) * 100:+.1f}% vs dense fine-tuned alike")
    lines += ["", "Anchor (Wanda paper, LLaMA-7B, WikiText-2 ppl): dense 5.68; 50% unstructured magnitude 17.29, "
              "SparseGPT 7.22, Wanda 7.26; 2:4 magnitude 42.13, SparseGPT 11.00, Wanda 11.53."]
    return "\n".join(lines)


def bench_semi_structured(args) -> str:
    """CUDA only: a 125m-shaped model (random weights: speed does not depend on them) pruned 2:4 by
    magnitude, bf16; prefill (batch 1 and 8 x 512 tokens) and batch-1 decode, dense vs 2:4 sparse."""
    from llmstack.kernels import resolve_ops
    from llmstack.model import Llama
    from llmstack.prune import prune_model
    from llmstack.prune.semi_structured import to_semi_structured
    if not torch.cuda.is_available():
        sys.exit("bench_prune.py --semi-structured: no CUDA device; 2:4 sparse kernels are GPU-only")
    t0 = time.perf_counter()
    cfg = load_config(CONFIGS_DIR / "model" / "125m.yaml")
    torch.manual_seed(0)
    dense = Llama(cfg.model, resolve_ops("auto", "cuda")).cuda().to(torch.bfloat16).eval()
    prune_model(dense, method="magnitude", pattern="2:4")
    sparse = Llama(cfg.model, resolve_ops("auto", "cuda")).cuda().to(torch.bfloat16).eval()
    sparse.load_state_dict(dense.state_dict())
    report = to_semi_structured(sparse)

    def prefill_ms(model, batch):
        x = torch.randint(0, cfg.model.vocab_size, (batch, 512), device="cuda")
        times = []
        with torch.no_grad():
            for i in range(args.repeats + 2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.hidden_states(x)
                torch.cuda.synchronize()
                if i >= 2:
                    times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    class _Ids:  # decode_tok_s encodes one prompt: give it token ids directly
        @staticmethod
        def encode(_):
            return list(range(1, 33))

    rows = [{"batch": b, "dense": prefill_ms(dense, b), "sparse": prefill_ms(sparse, b)} for b in (1, 8)]
    speeds = decode_tok_s({"dense": dense, "sparse": sparse}, _Ids, rounds=args.repeats, new_tokens=128)
    lines = [header("python scripts/bench_prune.py --semi-structured " + ("--write" if args.write else ""),
                    torch.cuda.get_device_name(), time.perf_counter() - t0), "",
             f"125m-shaped model, bf16, every block linear pruned 2:4 by magnitude; {len(report['swapped'])} linears "
             f"swapped to `to_sparse_semi_structured`, {len(report['dense'])} left dense "
             f"({', '.join(sorted(set(report['dense'].values()))) or 'none'}). Median of {args.repeats}.", "",
             "| phase | dense | 2:4 sparse | speed-up |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| prefill, batch {r['batch']} x 512 | {r['dense']:.2f} ms | {r['sparse']:.2f} ms | "
                     f"{r['dense'] / r['sparse']:.2f}x |")
    lines.append(f"| decode, batch 1 | {speeds['dense']:.0f} tok/s | {speeds['sparse']:.0f} tok/s | "
                 f"{speeds['sparse'] / speeds['dense']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="an existing run folder to prune instead of training one")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--recovery-lr", type=float, default=3e-4, help="peak lr of the recovery (cosine, as the recipe)")
    p.add_argument("--also-sparsity", type=float, nargs="*", default=[0.7],
                   help="extra unstructured sparsities, pruned and evaluated without recovery")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--semi-structured", action="store_true", help="CUDA: 2:4 sparse vs dense prefill and decode")
    p.add_argument("--repeats", type=int, default=10, help="--semi-structured: timing repeats")
    p.add_argument("--quick", action="store_true", help="30 teacher steps, 5 recovery steps, 2 batches: a smoke run")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    p.add_argument("--out", default="runs/bench_prune")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.semi_structured:
        text, marks = bench_semi_structured(args), GPU_MARKS
    else:
        if args.quick:
            args.teacher_steps, args.recovery_steps, args.calib_batches = 30, 5, 2
        res = run(args)
        (Path(args.out) / "results.json").write_text(json.dumps(res, indent=1))
        text, marks = table(res, ("python scripts/bench_prune.py " + " ".join(sys.argv[1:])).strip()), MARKS
    print(text)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", marks, text.splitlines())
    return 0


if __name__ == "__main__":
    sys.exit(main())

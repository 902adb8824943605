"""The training loop: build -> restore -> loop(step, log, eval, save) -> summarize.

Everything a resumed run needs is saved: weights, optimizer, step, data position and every RNG
(python, numpy, torch, per rank). The schedule is a pure function of the step, so it needs no
state. A resumed fp32 CPU run reproduces the uninterrupted loss curve bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import signal
import statistics
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from llmstack import checkpoint as ckpt
from llmstack import jsonio, parallel
from llmstack.config import Config, ConfigError, to_dict
from llmstack.data import build_data, eval_batches
from llmstack.generate import generate
from llmstack.kernels import resolve_ops
from llmstack.model import Llama
from llmstack.perf import peak_flops
from llmstack.pretrained import build_model
from llmstack.profiling import StepProfiler
from llmstack.runlock import RunLock
from llmstack.tracking import Tracker

log = logging.getLogger("llmstack")


class TrainingAborted(RuntimeError):
    pass


def lr_at(cfg: Config, step: int) -> float:
    s, peak, total = cfg.schedule, cfg.optim.lr, cfg.train.max_steps
    floor = peak * s.min_lr_ratio
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return peak
    if s.kind == "wsd":  # warmup-stable-decay: flat, then linear decay over the last decay_fraction
        decay_start = int(total * (1 - s.decay_fraction))
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, total - decay_start)
        return peak - (peak - floor) * min(frac, 1.0)
    frac = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to save and exit after the current step (preemption)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class NonFiniteWeights(TrainingAborted):
    pass


def save_checkpoint(cfg: Config, engine, data, *, step: int, run_dir: Path, extra: dict) -> Path:
    """Save the trainer's whole state atomically; never a state with non-finite weights, so the
    newest checkpoint is always the last good one (and pruning keeps it)."""
    if not engine.params_finite():
        good = ckpt.saved_steps(run_dir)
        raise NonFiniteWeights(f"weights are not finite at step {step}; not saved. Last good checkpoint: "
                               f"{good[0] if good else 'none'} (lower optim.lr or check the data)")

    def write(folder: Path) -> None:
        engine.save(folder)
        tensors, rest = ckpt.rng_state()
        suffix = f"_rank{engine.rank}" if engine.world > 1 else ""
        save_file(tensors, str(folder / f"rng{suffix}.safetensors"))
        state = {"step": step, "data": data.train.state_dict(), "rng": rest, **extra}
        (folder / f"trainer_state{suffix}.json").write_text(jsonio.dumps(state))
        if engine.is_main:
            (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            data.tokenizer.save(folder)
    return ckpt.atomic_save(run_dir, step, write, keep_last=cfg.checkpoint.keep_last,
                            is_main=engine.is_main, barrier=engine.barrier)


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """The verified checkpoint to continue from: the run's own newest one first, so a restarted job
    never goes back to the folder train.resume named. A run folder that holds checkpoints never
    starts over silently."""
    own = ckpt.latest_checkpoint(run_dir)  # falls back past a bad pointer; raises if none verifies
    if cfg.train.resume == "never":
        if own is not None:
            raise ckpt.CheckpointError(f"train.resume=never: {run_dir} already holds checkpoints ({own.name}); "
                                       "choose a new out_dir, or resume with train.resume=auto")
        return None
    if own is not None or cfg.train.resume == "auto":
        return own
    folder = ckpt.resolve_checkpoint(cfg.train.resume)
    if not any(folder.glob("trainer_state*.json")):
        raise ckpt.CheckpointError(f"train.resume: {folder} holds weights only (no trainer state); "
                                   f"start a new run from it with init_from={folder}")
    ckpt.verify(folder)
    return folder


def saved_step(folder: Path, rank_suffix: str) -> int:
    state = ckpt.read_json(folder / f"trainer_state{rank_suffix}.json")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or step < 0:
        raise ckpt.CheckpointError(f"{folder}/trainer_state{rank_suffix}.json: no valid step")
    return step


def check_resume_layout(cfg: Config, world: int, folder: Path) -> None:
    saved = ckpt.read_json(folder / "parallel.json") if (folder / "parallel.json").exists() else {"tp": 1, "pp": 1, "dp": 1}
    p = cfg.parallel
    now = {"tp": p.tp, "pp": p.pp, "dp": world // (p.tp * p.pp)}
    if any(saved[k] != now[k] for k in now):
        fmt = lambda d: " ".join(f"{k}={d[k]}" for k in ("tp", "pp", "dp"))  # noqa: E731
        raise ckpt.CheckpointError(
            f"{folder}: saved with {fmt(saved)}, this run has {fmt(now)}; resume with the saving layout, or "
            "`llmstack checkpoint consolidate` it and resume with one process")


def restore(cfg: Config, engine, data, folder: Path) -> dict:
    suffix = f"_rank{engine.rank}" if engine.world > 1 else ""
    state = ckpt.read_json(folder / f"trainer_state{suffix}.json")
    engine.load(folder)
    apply_optimizer_settings(cfg, engine.param_groups(), folder, announce=engine.is_main)
    data.train.load_state_dict(state["data"])
    ckpt.set_rng_state(ckpt.load_tensors(folder / f"rng{suffix}.safetensors"), state["rng"])
    return state


def apply_optimizer_settings(cfg: Config, groups: list[dict], folder: Path, *, announce: bool) -> None:
    """The optimizer settings of this run's config win over the checkpoint's, and every change is
    said in one line (the learning rate follows the schedule at every step anyway). Both engines
    build [matrices with decay, vectors without] groups, in that order."""
    o = cfg.optim
    wanted = [("optim.weight_decay", "weight_decay", o.weight_decay, groups[:1]),
              ("optim.eps", "eps", o.eps, groups), ("optim.beta1/beta2", "betas", (o.beta1, o.beta2), groups)]
    for key, field, value, targets in wanted:
        old = {tuple(g[field]) if isinstance(g[field], (list, tuple)) else g[field] for g in targets if field in g}
        if old and old != {value}:
            if announce:
                log.warning("%s: the checkpoint %s has %s, this run's config %s; using %s", key, folder.name,
                            ", ".join(map(str, sorted(old))), value, value)
            for g in targets:
                g[field] = value


def check_out_dir(run_dir: Path) -> None:
    """out_dir must be a folder we can write, before any work."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"out_dir: {run_dir} exists and is a file, not a folder")
    parent = run_dir if run_dir.exists() else next(p for p in run_dir.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir: {parent} is not writable")


def absolute_sources(cfg: Config) -> None:
    """init_from as an absolute path, so a saved config (a LoRA checkpoint needs its base) means the
    same folder wherever it is loaded from."""
    if cfg.init_from:
        hf = cfg.init_from.startswith("hf:")
        path = Path(cfg.init_from[3:] if hf else cfg.init_from)
        cfg.init_from = ("hf:" if hf else "") + str(path.resolve())


def train(cfg: Config, model_class=Llama, prepare_model=None) -> dict:
    """Train `model_class` (a Llama subclass, e.g. a distillation student) and return the summary.
    `prepare_model(model, device)` runs after weights are built/loaded and before wrapping."""
    run_dir = cfg.run_dir
    check_out_dir(run_dir)
    absolute_sources(cfg)
    place = parallel.setup(cfg)
    lock = RunLock(run_dir) if place.is_main else None
    created = lock is not None and not lock.path.exists()
    dir_created = not run_dir.exists()
    if lock is not None:
        lock.acquire()
    writing = []  # set once the run starts writing into run_dir
    # train.deterministic switches torch to deterministic kernels; the caller gets its setting back
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _train(cfg, place, model_class, prepare_model, on_first_write=lambda: writing.append(True))
    except BaseException:
        # refused before writing anything: leave the folder as it was (the lock file included)
        if created and not writing:
            lock.release()
            lock.path.unlink(missing_ok=True)
            if dir_created:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if lock is not None:
            lock.release()


def _train(cfg: Config, place, model_class, prepare_model, on_first_write) -> dict:
    run_dir = cfg.run_dir
    device = place.device
    suffix = f"_rank{place.rank}" if place.world > 1 else ""
    latest = resume_point(cfg, run_dir)
    if latest is not None:  # before reading any per-rank file: another layout names other files
        check_resume_layout(cfg, place.world, latest)
    if latest is not None and saved_step(latest, suffix) >= cfg.train.max_steps:
        return finished_summary(cfg, run_dir, latest, saved_step(latest, suffix), is_main=place.is_main)
    seed_everything(cfg.train.seed, place.rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    ops = resolve_ops(cfg.kernels.backend, device.type)
    data = build_data(cfg, rank=place.dp_rank, world=place.dp_world)
    model = build_model(cfg, device, ops, model_class)
    if prepare_model is not None:
        prepare_model(model, device)
    # counted whole: the engine may shard the model (TP, PP) or partition it (ZeRO-3)
    n_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.data.seq_len)
    engine = parallel.build_engine(cfg, model, device)
    if place.is_main:
        log.info("model %s: %s params; %s", cfg.model.name, f"{n_params:,}", engine.describe())
        log.info("kernels (backend=%s): %s", cfg.kernels.backend, ops.describe())

    start_step, extra_state = 0, {}
    if latest is not None:
        extra_state = restore(cfg, engine, data, latest)
        start_step = extra_state["step"]
        if place.is_main:
            log.info("resumed from %s at step %d", latest, start_step)
    if place.is_main:  # only now: a failed restore must leave the run folder untouched
        on_first_write()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if cfg.train.compile:
        engine.model.compile()

    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * place.dp_world
    peak = peak_flops(device)
    tracker = Tracker(cfg, run_dir, enabled=place.is_main, total_steps=cfg.train.max_steps, start_step=start_step,
                      resolved_config=to_dict(cfg))
    if start_step:
        tracker.event(start_step, "resumed", checkpoint=latest.name)
    # a fixed set of eval_batches global batches, identical for every layout of the same global batch
    val_set = eval_batches(data.val, cfg.train.eval_batches * cfg.train.grad_accum_steps * place.dp_world)
    recent_losses: deque = deque(extra_state.get("recent_losses", []), maxlen=50)
    nonfinite_in_row = 0
    skipped_total = extra_state.get("skipped_total", 0)
    # restored so that a resumed run's summary equals the uninterrupted run's
    last_loss = extra_state.get("last_loss")
    val_loss = extra_state.get("val_loss")
    profiler = _maybe_profiler(cfg, run_dir, place.is_main)
    t_start = time.perf_counter()
    window_t, window_tokens = time.perf_counter(), 0

    def state_extra() -> dict:
        return {"recent_losses": list(recent_losses), "skipped_total": skipped_total, "last_loss": last_loss,
                "val_loss": val_loss}

    if start_step == 0:  # the starting point of the val curve
        tracker.log_val(0, engine.eval_loss(val_set))
    with _StopFlag() as stop:
        step = start_step
        while step < cfg.train.max_steps:
            lr = lr_at(cfg, step)
            micro = [data.train.next_batch().to(device) for _ in range(cfg.train.grad_accum_steps)]
            result = engine.train_step(micro, lr)
            step += 1
            window_tokens += tokens_per_step
            if profiler is not None:
                profiler.step()

            if not result.applied:
                nonfinite_in_row += 1
                skipped_total += 1
                tracker.event(step, "nonfinite", loss=result.loss, grad_norm=result.grad_norm, in_row=nonfinite_in_row)
                if cfg.train.nonfinite == "abort" or nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                    # the skipped step changed no weights, so this checkpoint is the last good state
                    path = save_checkpoint(cfg, engine, data, step=step, run_dir=run_dir, extra=state_extra())
                    raise TrainingAborted(f"non-finite loss/grad norm at step {step} ({nonfinite_in_row} in a row, "
                                          f"train.nonfinite={cfg.train.nonfinite}); last good state saved to {path}")
            else:
                if cfg.train.nonfinite == "skip" and not engine.params_finite():
                    # a finite gradient can still overflow the weights (a huge lr): nothing to save
                    good = ckpt.saved_steps(run_dir)
                    tracker.event(step, "nonfinite_weights", loss=result.loss, grad_norm=result.grad_norm)
                    raise NonFiniteWeights(f"weights became non-finite in the update of step {step} (loss "
                                           f"{result.loss:.4g}, grad norm {result.grad_norm:.4g}); not saved. Last good "
                                           f"checkpoint: {good[0] if good else 'none'}")
                nonfinite_in_row = 0
                last_loss = result.loss
                if len(recent_losses) >= 10 and result.loss > cfg.train.spike_factor * statistics.median(recent_losses):
                    tracker.event(step, "loss_spike", loss=result.loss, median=statistics.median(recent_losses))
                recent_losses.append(result.loss)

            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or step == start_step + 1:
                elapsed = time.perf_counter() - window_t
                tok_s = window_tokens / max(elapsed, 1e-9)
                tracker.log(step, {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tok_s,
                                   "mfu": tok_s * flops_per_token / peak["peak"] / max(place.world, 1),
                                   "peak_mem_bytes": peak_memory_bytes(device), "skipped_steps": skipped_total,
                                   "tokens": step * tokens_per_step})
                window_t, window_tokens = time.perf_counter(), 0
            tracker.advance()

            if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                val_loss = engine.eval_loss(val_set)
                tracker.log_val(step, val_loss)
            stopping = stop.signal is not None
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps or (
                    stopping and cfg.checkpoint.save_on_interrupt):
                path = save_checkpoint(cfg, engine, data, step=step, run_dir=run_dir, extra=state_extra())
                if cfg.logging.log_checkpoint_artifact:
                    tracker.log_artifact(path, f"{cfg.run_name}-step{step}")
            if stopping:
                tracker.write(f"signal {stop.signal}: saved step {step}, exiting")
                break

    wall = time.perf_counter() - t_start
    if profiler is not None:
        profiler.stop()
    steps_done = step - start_step
    summary = {"final_train_loss": last_loss, "final_val_loss": val_loss,
               "val_ppl": math.exp(min(val_loss, 50)) if val_loss is not None else None,
               "tokens_per_s": steps_done * tokens_per_step / max(wall, 1e-9),
               "mfu": steps_done * tokens_per_step * flops_per_token / max(wall, 1e-9) / peak["peak"] / max(place.world, 1),
               "peak_flops": peak, "params": n_params, "steps": step, "steps_this_run": steps_done,
               "skipped_steps": skipped_total, "wall_s": wall, "peak_mem_bytes": peak_memory_bytes(device),
               "kernels": ops.backends, "layout": engine.describe(), "interrupted": step < cfg.train.max_steps,
               "signal": stop.signal,
               "run_dir": str(run_dir)}
    if place.is_main and not summary["interrupted"] and cfg.train.sample_tokens > 0:
        summary["sample"] = _sample(cfg, engine.eval_model(), data.tokenizer, device)
        tracker.write("sample:\n" + cfg.train.sample_prompt + summary["sample"])
    tracker.finish(summary)
    engine.close()
    return summary


def finished_summary(cfg: Config, run_dir: Path, folder: Path, step: int, *, is_main: bool) -> dict:
    """A run already at train.max_steps is left exactly as it is: nothing is trained or written."""
    if is_main:
        log.info("%s is already at step %d (train.max_steps=%d); nothing to do. Raise train.max_steps to "
                 "train further.", run_dir, step, cfg.train.max_steps)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    return {**summary, "steps": step, "steps_this_run": 0, "already_finished": True, "checkpoint": str(folder),
            "signal": None}


def _sample(cfg: Config, model, tokenizer, device) -> str:
    ids = tokenizer.encode(cfg.train.sample_prompt)
    torch.manual_seed(cfg.train.seed)
    out = generate(model, [ids], max_new_tokens=cfg.train.sample_tokens, temperature=0.8, top_k=40,
                   stop_tokens=[tokenizer.eot_id])
    return tokenizer.decode(out.tokens[0])


def _maybe_profiler(cfg: Config, run_dir: Path, is_main: bool):
    if not (cfg.train.profile and is_main):
        return None
    return StepProfiler(run_dir, *cfg.train.profile_steps)

"""Run observability: progress bar, metrics.jsonl, W&B, summary.json and the loss-curve PNG.

Only the main rank tracks. W&B is offline unless WANDB_MODE says otherwise or credentials exist,
so a run never blocks on the network; `wandb sync <run>/wandb/offline-run-*` uploads it later.
Secrets (W&B keys, tokens) are never written: the config holds none and the environment is not logged.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import uuid

from llmstack import jsonio
from pathlib import Path

log = logging.getLogger("llmstack")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Tracker:
    def __init__(self, cfg, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, resolved_config: dict):
        self.enabled = enabled
        self.run_dir = run_dir
        self.pbar = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.train.progress:
            from tqdm import tqdm
            self.pbar = tqdm(total=total_steps, initial=start_step, desc=cfg.run_name, dynamic_ncols=True,
                             mininterval=1.0)
        if cfg.logging.wandb:
            self._init_wandb(cfg, resolved_config)

    def _init_wandb(self, cfg, resolved_config: dict) -> None:
        try:
            import wandb  # wandb: optional, only with tracking.wandb
        except ImportError:
            log.warning("logging.wandb=true but wandb is not installed; skipping W&B")
            return
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        lg = cfg.logging
        self.wandb = wandb.init(project=lg.project, name=lg.name or cfg.run_name, group=lg.group, tags=lg.tags or None,
                                entity=lg.entity, id=run_id, resume="allow", dir=str(self.run_dir),
                                mode=wandb_mode(), config={**resolved_config, "git_commit": git_commit()},
                                settings=wandb.Settings(console="off", quiet=True))
        log.info("W&B run %s (%s mode) in %s", run_id, wandb_mode(), self.run_dir / "wandb")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.metrics_file.write(jsonio.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)

    def log_val(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        self.metrics_file.write(jsonio.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({"val/loss": val_loss, "val/ppl": record["val_ppl"]}, step=step)
        self.write(f"step {step}: val loss {val_loss:.4f}, ppl {record['val_ppl']:.2f}")

    def event(self, step: int, kind: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"step": step, "event": kind, **fields}
        self.metrics_file.write(jsonio.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"events/{kind}": 1, **{f"events/{kind}_{k}": v for k, v in fields.items()
                                                    if isinstance(v, (int, float))}}, step=step)
        self.write(f"step {step}: {kind} {fields}")

    def advance(self, n: int = 1) -> None:
        if self.pbar is not None:
            self.pbar.update(n)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.pbar is not None:
            self.pbar.write(message)
        else:
            log.info(message)

    def log_artifact(self, folder: Path, name: str) -> None:
        if self.wandb is None:
            return
        import wandb
        art = wandb.Artifact(name, type="model")
        art.add_dir(str(folder))
        self.wandb.log_artifact(art)

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        if self.pbar is not None:
            self.pbar.close()
        (self.run_dir / "summary.json").write_text(jsonio.dumps(summary, indent=2))
        self.plot()
        if self.wandb is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.wandb.summary[k] = v
            self.wandb.finish()
        self.metrics_file.close()

    def plot(self) -> None:
        rows = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]
        # a resumed run logs again the steps after its checkpoint: the later record of a step wins
        train = sorted({r["step"]: r["loss"] for r in rows if r.get("loss") is not None}.items())
        val = sorted({r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None}.items())
        if not train:
            return
        import matplotlib  # matplotlib: only for the loss plot
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss.png", dpi=100)
        plt.close(fig)

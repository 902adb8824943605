"""Argument helpers shared by the command modules."""
from __future__ import annotations

import argparse

from llmstack.config import CONFIGS_DIR, load_config
from llmstack.errors import UserError


def config_parser(prog: str, desc: str, actions: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"llmstack {prog}", description=desc)
    if actions:  # before the overrides, or `llmstack data build key=value` reads `build` as an override
        p.add_argument("action", choices=actions)
    p.add_argument("--config", default=None, help="run config YAML (default configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 optim.lr=3e-4")
    return p


def load_run_config(args):
    """The run config named by --config (default configs/tiny.yaml) with the dotted overrides."""
    return load_config(args.config or CONFIGS_DIR / "tiny.yaml", args.overrides)


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments become one `llmstack: error:` line (exit 2) instead of argparse's usage block."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")

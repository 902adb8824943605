"""`llmstack distill [--config FILE] distill.teacher=PATH [overrides]`."""
from __future__ import annotations

import logging

from llmstack import jsonio
from llmstack.cli.common import config_parser, load_run_config
from llmstack.distill import DistillError, distill

log = logging.getLogger("llmstack")


def distill_main(argv: list[str]) -> int:
    args = config_parser("distill", "Distill a teacher checkpoint into a student config.").parse_args(argv)
    cfg = load_run_config(args)
    if not cfg.distill.teacher:
        raise DistillError("distill.teacher: not set; give a checkpoint, run or HF folder (distill.teacher=PATH)")
    summary = distill(cfg)
    keys = ("final_train_loss", "final_val_loss", "val_ppl", "tokens_per_s", "steps", "wall_s", "teacher")
    log.info("summary: %s", jsonio.dumps({k: summary.get(k) for k in keys}))
    return 0

"""`train.profile=true`: a torch profiler trace over a window of steps, and the top ops printed."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("llmstack")


class StepProfiler:
    def __init__(self, run_dir: Path, start: int, stop: int):
        self.run_dir, self.start, self.stop_at = run_dir, start, stop
        self.step_no = 0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True,
            schedule=torch.profiler.schedule(wait=max(start - 1, 0), warmup=1, active=max(stop - start, 1), repeat=1))
        self.prof.__enter__()
        self.closed = False

    def step(self) -> None:
        if self.closed:
            return
        self.prof.step()
        self.step_no += 1
        if self.step_no >= self.stop_at + 1:
            self.stop()

    def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.prof.__exit__(None, None, None)
        trace = self.run_dir / "profile_trace.json"
        try:
            self.prof.export_chrome_trace(str(trace))
        except RuntimeError:
            return
        sort = "cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=15)
        (self.run_dir / "profile_top_ops.txt").write_text(table)
        log.info("profiler trace: %s\n%s", trace, table)

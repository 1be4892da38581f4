"""The few lines a run prints at its end: what it did, how fast, how well, where everything went."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunSummary:
    """Collects from the log lines as they are written, and renders the end-of-run summary."""

    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    timed_tokens: int = 0
    timed_seconds: float = 0.0
    best_eval_loss: float | None = None
    best_eval_step: int | None = None

    def observe(self, values: dict[str, Any], step: int) -> None:
        self.tokens = max(self.tokens, int(values.get("tokens", 0)))
        loss = values.get("eval_loss")
        if loss is not None and (self.best_eval_loss is None or loss < self.best_eval_loss):
            self.best_eval_loss, self.best_eval_step = loss, step

    def add_timing(self, tokens: int, seconds: float) -> None:
        self.timed_tokens += tokens
        self.timed_seconds += seconds

    def render(self, *, output_dir: str, flops_per_token: float, peak_flops: float | None, processes: int,
               upload_target: str | None, stopped: bool) -> str:
        wall = time.perf_counter() - self.started
        lines = [f"timl: {'stopped after' if stopped else 'trained on'} {self.tokens:,} tokens in {wall:,.0f} s."]
        if self.timed_seconds:
            speed = self.timed_tokens / self.timed_seconds
            mfu = f", MFU {speed / processes * flops_per_token / peak_flops:.1%}" if peak_flops else ""
            lines.append(f"  mean {speed:,.0f} tokens/s over the timed steps{mfu} (first step and evals excluded)")
        if self.best_eval_loss is not None:
            lines.append(f"  best eval loss {self.best_eval_loss:.4f} at step {self.best_eval_step}")
        final = "the last step{N}/ folder" if stopped else f"{output_dir}/main (AutoModelForCausalLM.from_pretrained)"
        lines.append(f"  checkpoints: {output_dir}/step{{N}}/, model in {final}; metrics: {output_dir}/metrics.jsonl")
        if upload_target:
            lines.append(f"  uploads: {upload_target}")
        lines.append("  to continue or extend it: the same command with --resume_from_checkpoint latest")
        return "\n".join(lines)

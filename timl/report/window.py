"""What accumulates between two log lines of the training loop, on the device until a log step reads it."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from timl.train.step import StepResult


class LogWindow:
    """What accumulates between two log lines: loss on the device, and train time without evals and saves."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # Cross-entropy and z-loss summed over the finite steps, and their count: a skipped step's NaN stays out.
        self.loss_sum = torch.zeros(2, device=self.device)
        self.finite_steps = torch.zeros((), device=self.device)
        self.steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Times from now: the steps before (compilation, warm-up) stay out of the throughput."""
        self.timed_steps, self.excluded_seconds, self.data_seconds = 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.loss_sum += torch.where(result.nonfinite, 0.0, result.loss)
        self.finite_steps += (~result.nonfinite).float()
        self.grad_norm, self.learning_rates = result.grad_norm, result.learning_rates
        self.steps += 1
        self.timed_steps += 1
        self.data_seconds += result.data_seconds

    def read(self, *, tokens_per_step: int, with_z_loss: bool, flops_per_token: float, peak_flops: float | None,
             processes: int) -> tuple[dict[str, float], tuple[int, float] | None]:
        """The window's train values (losses, learning rates, grad norm, throughput, MFU, peak memory) and its timed
        (tokens, seconds), or None when no step was timed; then starts the next window. Reads the device once."""
        loss, z_loss = self.mean_losses()
        values = {"train_loss": loss, **({"train_z_loss": z_loss} if with_z_loss else {}), **self.learning_rates,
                  "grad_norm": float(self.grad_norm)}
        seconds, timing = self.train_seconds(), None
        if self.timed_steps:
            tokens = self.timed_steps * tokens_per_step
            timing = (tokens, seconds)
            values.update(tokens_per_second=tokens / seconds, step_seconds=seconds / self.timed_steps,
                          data_wait_fraction=self.data_seconds / seconds)
            if peak_flops:
                values["mfu"] = tokens / seconds / processes * flops_per_token / peak_flops
        if torch.cuda.is_available():
            values["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.reset()
        return values, timing

    def mean_losses(self) -> list[float]:
        """The window's mean cross-entropy and z-loss over its finite steps (NaN if it had none)."""
        finite_steps = self.finite_steps.item()
        return (self.loss_sum / finite_steps).tolist() if finite_steps else [math.nan, math.nan]

    def train_seconds(self) -> float:
        # Called after the loss's .item(), so the device has finished the window's work.
        return time.perf_counter() - self.start - self.excluded_seconds

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_seconds += time.perf_counter() - start

"""What accumulates between two log lines of the training loop, on the device until a log step reads it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    """One optimizer step's outcome, still on the device where it can be."""

    loss: torch.Tensor  # [cross-entropy, z-loss], each the global mean over labelled tokens
    grad_norm: torch.Tensor
    learning_rates: dict[str, float]
    stop_votes: torch.Tensor
    data_seconds: float


class LogWindow:
    """What accumulates between two log lines: loss on the device, and train time without evals and saves."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros(2, device=self.device)  # cross-entropy and z-loss
        self.steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Times from now: the steps before (compilation, warm-up) stay out of the throughput."""
        self.timed_steps, self.excluded_seconds, self.data_seconds = 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.loss_sum += result.loss
        self.grad_norm, self.learning_rates = result.grad_norm, result.learning_rates
        self.steps += 1
        self.timed_steps += 1
        self.data_seconds += result.data_seconds

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

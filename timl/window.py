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


class StopVotes:
    """The processes' count of stop votes, each step's read on the host one step later.

    Reading a step's own count (`.item()`) would make the host wait for the GPU to finish that step's all-reduce, and
    leave the GPU idle until the host queued the next step: once every step. One step later, the copy to pinned memory
    finished long ago while the next step is already queued, so the wait costs nothing. Every process reads the same
    all-reduced count after the same step, so all of them still stop together, one step after the vote."""

    def __init__(self, device: torch.device):
        # Two pinned buffers in turn: one holds the count being read while the other receives the next.
        self.pinned = [torch.zeros((), pin_memory=True) for _ in range(2)] if device.type == "cuda" else None
        self.queued: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.count = 0

    def swap(self, votes: torch.Tensor) -> bool:
        """Queues this step's count for the host; returns whether the previous step's count asked to stop."""
        previous = self.queued
        if self.pinned is None:
            self.queued = (votes, None)  # on the CPU the count is already on the host
        else:
            host = self.pinned[self.count % 2]
            host.copy_(votes, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self.queued = (host, copied)
        self.count += 1
        if previous is None:
            return False
        host, copied = previous
        if copied is not None:
            copied.synchronize()
        return host.item() > 0

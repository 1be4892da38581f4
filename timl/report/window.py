"""What accumulates between two log lines of the training loop, on the device until a log step reads it."""

from __future__ import annotations

import contextlib
import math
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
    nonfinite: torch.Tensor  # whether the loss or the grad norm was NaN or inf (the same on every process)
    data_seconds: float

    def signals(self) -> torch.Tensor:
        """What the host must act on, read one step late (StepSignals): stop votes, non-finite, loss, grad norm."""
        return torch.stack([self.stop_votes.float(), self.nonfinite.float(), self.loss[0].float(),
                            self.grad_norm.float()])


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


class StepSignals:
    """Each step's signals for the host (stop votes, a non-finite loss or grad norm), read one step later.

    Reading a step's own values (`.item()`) would make the host wait for the GPU to finish that step, and leave the
    GPU idle until the host queued the next step: once every step. One step later, the copy to pinned memory
    finished long ago while the next step is already queued, so the wait costs nothing. The values are the same on
    every process (all-reduced), so all of them act on them after the same step. Before a save, `drain` reads the
    last step's at once: nothing is saved after a step that went bad."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pinned: torch.Tensor | None = None  # the one buffer: push reads the previous values before reusing it
        self.queued: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None

    def push(self, step: int, signals: torch.Tensor) -> tuple[int, list[float]] | None:
        """Queues step `step`'s signals; returns the previous step's (its number and values), if any."""
        previous = self.drain()
        if not self.cuda:
            self.queued = (step, signals, None)  # on the CPU the values are already on the host
        else:
            if self.pinned is None:
                self.pinned = torch.zeros(signals.shape, pin_memory=True)
            self.pinned.copy_(signals, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self.queued = (step, self.pinned, copied)
        return previous

    def drain(self) -> tuple[int, list[float]] | None:
        """The queued step's number and values, now (waiting for the copy if needed); nothing stays queued."""
        if self.queued is None:
            return None
        (step, host, copied), self.queued = self.queued, None
        if copied is not None:
            copied.synchronize()
        return step, host.tolist()

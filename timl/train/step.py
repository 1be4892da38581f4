"""One optimizer step: the accumulated micro-batches' forwards and backwards, the clip, the update, and what the
host must learn of it (StepResult, StepSignals), kept on the device until it is read.

The loss is exact under gradient accumulation and DDP: every micro-batch's summed token loss is divided by the
global count of labelled tokens (counted first, in the step's one small all-reduce), so the shares sum to the
global mean however the labels fall.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from timl.loss.cross_entropy import count_labelled


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


def training_step(accelerator: Any, module: torch.nn.Module, forward_loss: Any, optim: Any,
                  parameters: Iterable[torch.nn.Parameter], batches: Iterator[dict[str, torch.Tensor]], *,
                  accumulation_steps: int, max_grad_norm: float, stop_requested: bool = False,
                  metrics: Sequence[Any] = ()) -> StepResult:
    """One optimizer step over `accumulation_steps` micro-batches of `batches`: `forward_loss(inputs, num_items)`
    (the compiled or plain `module`, the one DDP or FSDP wraps) gives each micro-batch's share of the loss, and
    `optim` (an OptimizerSet) steps unless the step's loss or grad norm is not finite. A stop request rides on the
    step's all-reduce, so that every process learns of it at the same step. `metrics` see each micro-batch's
    outputs (the logits loss path returns them)."""
    data_start = time.perf_counter()
    micro_batches = [next(batches) for _ in range(accumulation_steps)]
    data_seconds = time.perf_counter() - data_start
    # torch.full fills on the device: torch.tensor would copy from the host and wait for the GPU every step.
    local = torch.stack([sum(count_labelled(batch) for batch in micro_batches).float(),
                         torch.full((), float(stop_requested), device=accelerator.device)])
    num_items, stop_votes = accelerator.reduce(local, reduction="sum")
    num_items = num_items.clamp(min=1)
    step_loss = torch.zeros((), device=accelerator.device)
    step_z_loss = torch.zeros((), device=accelerator.device)
    for index, inputs in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(module):
            loss, z_loss, outputs = forward_loss(inputs, num_items)
            # DDP averages gradients over processes; the shares are meant to be summed.
            accelerator.backward(loss * accelerator.num_processes)
        step_loss += loss.detach() - z_loss
        step_z_loss += z_loss
        for metric in metrics:
            metric.update(outputs, inputs)
    # Without clipping, an infinite bound clips nothing and still returns the total norm, which is logged.
    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: the same whole norm on every rank
        grad_norm = grad_norm.full_tensor()
    # Every process's share of the loss, summed: the global mean, so that all of them judge the same values.
    losses = accelerator.reduce(torch.stack([step_loss, step_z_loss]), reduction="sum")
    nonfinite = ~(torch.isfinite(losses).all() & torch.isfinite(grad_norm))
    learning_rates = optim.learning_rates()
    optim.step(skip=nonfinite)
    return StepResult(losses, grad_norm, learning_rates, stop_votes, nonfinite, data_seconds)

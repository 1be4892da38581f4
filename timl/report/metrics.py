"""Metrics: objects updated on every batch, reduced across ranks, and reported as plain numbers.

A metric keeps its running sums on the device, so updating it never waits for the GPU; `gather` sums them over the
processes at a log or eval step, and `to_dict` turns them into numbers. The Trainer prefixes the names with `train_`
or `eval_`. The same object works at training and at evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch

from timl.loss.cross_entropy import IGNORE_INDEX, token_losses


@runtime_checkable
class Metric(Protocol):
    """What the Trainer calls. `outputs` is the model's output (with `.logits`), `inputs` the batch."""

    def update(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> None: ...

    def gather(self, accelerator: Any) -> None:
        """Sums the state over all processes; every process must call it."""
        ...

    def to_dict(self) -> dict[str, float]: ...

    def reset(self) -> None: ...


class TokenAverage:
    """A base for metrics that average a per-token quantity over the labelled tokens."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count: torch.Tensor | float = 0.0

    def per_token(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The quantity for each labelled position, flattened; labels are IGNORE_INDEX-free here."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> None:
        labels = inputs["labels"].flatten()
        keep = labels != IGNORE_INDEX
        logits = outputs.logits.flatten(0, -2)[keep]
        self.add(self.per_token(logits, labels[keep]), labels[keep])

    @torch.no_grad()
    def add(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds per-token values [tokens]; positions whose label is IGNORE_INDEX are left out."""
        keep = labels.flatten() != IGNORE_INDEX
        self.total = self.total + values.flatten()[keep].float().sum()
        self.count = self.count + keep.sum()

    def gather(self, accelerator: Any) -> None:
        state = torch.stack([torch.as_tensor(self.total, dtype=torch.float64, device=accelerator.device),
                             torch.as_tensor(self.count, dtype=torch.float64, device=accelerator.device)])
        self.total, self.count = accelerator.reduce(state, reduction="sum").tolist()

    def mean(self) -> float:
        return float(self.total) / max(float(self.count), 1.0)


class CrossEntropy(TokenAverage):
    """Mean next-token cross-entropy, reported as `loss`."""

    def per_token(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cross_entropy, _ = token_losses(logits.float(), labels)
        return cross_entropy

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.mean()}


class Perplexity(CrossEntropy):
    """exp of the mean next-token cross-entropy, reported as `perplexity`."""

    def to_dict(self) -> dict[str, float]:
        return {"perplexity": math.exp(min(self.mean(), 700.0))}


class Accuracy(TokenAverage):
    """The share of labelled tokens whose most likely prediction is right, reported as `accuracy`."""

    def per_token(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1) == labels

    def to_dict(self) -> dict[str, float]:
        return {"accuracy": self.mean()}


def report(metrics: list[Metric], accelerator: Any, prefix: str) -> dict[str, float]:
    """Gathers, reads and resets the metrics; returns their values with the prefix."""
    values: dict[str, float] = {}
    for metric in metrics:
        metric.gather(accelerator)
        values.update({f"{prefix}{name}": value for name, value in metric.to_dict().items()})
        metric.reset()
    return values

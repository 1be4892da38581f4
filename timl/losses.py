"""Next-token losses, and how a user's loss function is made exact under gradient accumulation and DDP.

The loader's labels are already shifted (labels[t] is the token after input_ids[t]), so the loss compares logits[t]
with labels[t] directly. Hugging Face causal LMs would shift `labels=` a second time and train on token t+2, which
is why timl never passes labels to the model.

The Trainer wants, from every micro-batch on every rank, that micro-batch's share of the global mean: its summed
token loss divided by the number of labelled tokens in the whole global batch (`num_items_in_batch`). Summed over
micro-batches and ranks, the shares make the exact global mean, however the tokens fall.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from timl.loader import IGNORE_INDEX

LossFunction = Callable[..., torch.Tensor]
"""`loss(outputs, inputs, num_items_in_batch) -> share of the global mean`, or `loss(outputs, inputs) -> mean
over this micro-batch's labelled tokens`; timl rescales the second kind into the first."""


def next_token_loss(outputs: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[t] against the already-shifted labels[t], summed and divided by the global count."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    summed = F.cross_entropy(
        logits.flatten(0, -2).float(), inputs["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return summed / num_items_in_batch


def count_labelled(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The number of positions with a target, as a device tensor (no host sync)."""
    return (inputs["labels"] != IGNORE_INDEX).sum()


def as_global_share(loss_function: LossFunction) -> Callable[[Any, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """Adapts a loss function to return its micro-batch's share of the global mean (see the module docstring)."""
    parameters = inspect.signature(loss_function).parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_count = len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in parameters)
    if takes_count:
        return loss_function

    def weighted_mean(outputs: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
        # A micro-batch mean weighs in by its share of the labelled tokens, which makes the sum the global mean.
        return loss_function(outputs, inputs) * count_labelled(inputs) / num_items_in_batch

    return weighted_mean

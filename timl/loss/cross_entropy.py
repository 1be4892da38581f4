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

IGNORE_INDEX = -100
"""The label of a position with no target (cross-entropy's ignore_index): padding, and the token after the data's
last. The loaders write it; every loss and metric skips it."""

LOSS_PATHS = ("logits", "full", "chunked", "liger", "cut_cross_entropy")
"""How the training loss is computed. logits: from the model's own forward. full: the checked head's logits from
the hidden states, in one piece. chunked: the same, a chunk of tokens at a time, never holding the full logits.
liger, cut_cross_entropy: those packages' fused kernels (CUDA only)."""

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


def cross_entropy_and_z_loss(logits: torch.Tensor, labels: torch.Tensor,
                             z_loss_coefficient: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of [tokens, vocab] logits, and the summed z-loss (coefficient × logsumexp²) over the
    labelled tokens."""
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if not z_loss_coefficient:
        return cross_entropy, torch.zeros_like(cross_entropy)
    log_normalizers = torch.logsumexp(logits, dim=-1)
    z_loss = z_loss_coefficient * (log_normalizers.square() * (labels != IGNORE_INDEX)).sum()
    return cross_entropy, z_loss


def finish_head(logits: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float | None) -> torch.Tensor:
    """What a head does after its matmul, on fp32 `hidden @ weight.T`: add the bias, scale, softcap."""
    if bias is not None:
        logits = logits + bias.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0,
                softcap: float | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """fp32 logits of an output head: (hidden @ weight.T + bias) × scale, softcapped; rows of weight from
    `vocab_size` on are padding and get -inf."""
    logits = finish_head((hidden @ weight.T).float(), bias, scale, softcap)
    if vocab_size is not None and weight.shape[0] > vocab_size:
        # Out of place, so that the compiler fuses the mask into the cross-entropy instead of keeping fp32 logits.
        padding = torch.arange(weight.shape[0], device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    return logits


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                         vocab_size: int | None = None, z_loss_coefficient: float = 0.0, path: str = "full",
                         kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of the head's logits against labels (already shifted), over the first
    `vocab_size` rows of weight; and the summed z-loss. `path` picks how (see LOSS_PATHS); all give the same
    values up to rounding."""
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    vocab_size = vocab_size or weight.shape[0]
    if path == "full":
        logits = head_logits(hidden, weight, bias, scale, softcap, vocab_size)
        return cross_entropy_and_z_loss(logits, labels, z_loss_coefficient)
    if path == "chunked":
        from timl.loss.chunked import linear_cross_entropy as chunked

        return chunked(hidden, weight, labels, bias=bias, scale=scale, softcap=softcap, vocab_size=vocab_size,
                       z_loss_coefficient=z_loss_coefficient, **(kwargs or {}))
    if path in ("liger", "cut_cross_entropy"):
        from timl.model import kernels

        fused = kernels.liger_loss_sum if path == "liger" else kernels.cut_cross_entropy_loss_sum
        return fused(hidden, weight, labels, bias=bias, scale=scale, softcap=softcap, vocab_size=vocab_size,
                     z_loss_coefficient=z_loss_coefficient, kwargs=kwargs or {})
    raise ValueError(f"Unknown loss path {path!r}; the paths are {', '.join(LOSS_PATHS)}.")


def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                        bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                        vocab_size: int | None = None, logits_consumer: Any = None) -> torch.Tensor:
    """Per-token cross-entropy [tokens] (0 where ignored) of the head's logits, a chunk of tokens at a time;
    `logits_consumer(logits, labels)` sees each chunk's fp32 logits over the real vocab. For evaluation."""
    from timl.loss.chunked import chunked_token_losses

    return chunked_token_losses(hidden.flatten(0, -2), weight, labels.flatten(), bias=bias, scale=scale,
                                softcap=softcap, vocab_size=vocab_size, logits_consumer=logits_consumer)

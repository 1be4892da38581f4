"""Next-token cross-entropy and z-loss, written once: timl's own loss paths (all but the fused kernels), the
evaluation and the metrics compute them through `token_losses`; the head's logits and their vocab padding; and how a
user's loss function is made exact under gradient accumulation and DDP.

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

IGNORE_INDEX = -100
"""The label of a position with no target (cross-entropy's ignore_index): padding, and the token after the data's
last. The loaders write it; every loss and metric skips it."""

LossFunction = Callable[..., torch.Tensor]
"""`loss(outputs, inputs, num_items_in_batch) -> share of the global mean`, or `loss(outputs, inputs) -> mean
over this micro-batch's labelled tokens`; timl rescales the second kind into the first."""


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (0 where the label is IGNORE_INDEX) and logsumexp, of fp32 logits [tokens, vocab]
    against labels [tokens]. The one logsumexp serves both the cross-entropy and the z-loss."""
    labelled = labels != IGNORE_INDEX
    log_normalizers = torch.logsumexp(logits, dim=-1)
    # Ignored positions gather column 0 and are zeroed after: gather takes no -100.
    target_logits = logits.gather(-1, torch.where(labelled, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labelled, log_normalizers - target_logits, 0.0), log_normalizers


def summed_z_loss(log_normalizers: torch.Tensor, labels: torch.Tensor, coefficient: float) -> torch.Tensor:
    """coefficient × the sum of logsumexp² over the labelled tokens (PaLM's z-loss, summed like the loss)."""
    if not coefficient:
        return log_normalizers.new_zeros((), dtype=torch.float32)
    return coefficient * torch.where(labels != IGNORE_INDEX, log_normalizers.square(), 0.0).sum()


def cross_entropy_and_z_loss(logits: torch.Tensor, labels: torch.Tensor,
                             z_loss_coefficient: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of logits [..., vocab] against labels [...], and the summed z-loss over the same
    labelled tokens; in fp32, from one pass over the logits."""
    labels = labels.flatten()
    per_token, log_normalizers = token_losses(logits.flatten(0, -2).float(), labels)
    return per_token.sum(), summed_z_loss(log_normalizers, labels, z_loss_coefficient)


def z_loss(logits: torch.Tensor, labels: torch.Tensor, coefficient: float) -> torch.Tensor:
    """The summed z-loss alone, for a user's loss on the logits, whose cross-entropy (if any) is its own."""
    if not coefficient:
        return logits.new_zeros((), dtype=torch.float32)
    return summed_z_loss(torch.logsumexp(logits.flatten(0, -2).float(), dim=-1), labels.flatten(), coefficient)


def next_token_loss(outputs: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[t] against the already-shifted labels[t], summed and divided by the global count."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    cross_entropy, _ = cross_entropy_and_z_loss(logits, inputs["labels"])
    return cross_entropy / num_items_in_batch


def count_labelled(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The number of positions with a target, as a device tensor (no host sync)."""
    return (inputs["labels"] != IGNORE_INDEX).sum()


def as_global_share(loss_function: LossFunction
                    ) -> Callable[[Any, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
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


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """logits [..., weight rows] with the columns from `vocab_size` on (padded vocab rows) at -inf: no probability
    mass, and no gradient. Logits given to users and metrics instead drop those columns."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    padding = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    # Out of place, so that the compiler fuses the mask into the cross-entropy instead of keeping fp32 logits.
    return logits.masked_fill(padding, float("-inf"))


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
    return mask_vocab_padding(finish_head((hidden @ weight.T).float(), bias, scale, softcap), vocab_size)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                         vocab_size: int | None = None, z_loss_coefficient: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The "full" loss path: summed next-token cross-entropy of the head's logits against labels (already shifted),
    over the first `vocab_size` rows of weight, and the summed z-loss; the [tokens, vocab] logits in one piece.
    timl.loss.chunked and timl.loss.fused compute the same without them."""
    logits = head_logits(hidden.flatten(0, -2), weight, bias, scale, softcap, vocab_size)
    return cross_entropy_and_z_loss(logits, labels, z_loss_coefficient)

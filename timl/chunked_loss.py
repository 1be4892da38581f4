"""A linear head + next-token cross-entropy that never holds the whole [tokens, vocab] logits.

The head is `z = (hidden @ weight.T + bias) * scale`, optionally soft-capped as `softcap * tanh(z / softcap)`.
Rows of `weight` at or past `vocab_size` are vocab padding: they take part in no logit, which is the same as a
-inf logit (zero probability) and leaves their gradient exactly zero.

Tokens go through the head a chunk at a time. When training, each chunk's gradient is worked out in the forward,
while its logits are still at hand, and only the gradients of the inputs are kept for the backward; so the
backward is a few multiplications, and no chunk's logits are ever computed twice. Logit maths is in fp32 whatever
the input dtype; the matmuls run in the inputs' dtype, as they would in the model.

Everything is traceable by torch.compile: no `.item()`, no branching on tensor values, no host syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from timl.loader import IGNORE_INDEX
from timl.losses import finish_head

LogitsConsumer = Callable[[torch.Tensor, torch.Tensor], None]
"""Called with each chunk's fp32 logits [rows, vocab_size] and its labels [rows], e.g. to count correct argmaxes."""

_LOGIT_ELEMENTS_PER_CHUNK = 2**26
"""256 MiB of fp32 logits per chunk: large enough to keep the matmuls efficient, small enough that the few
chunk-sized buffers of the gradient maths stay around a gigabyte even for 256k vocabularies."""


def default_chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk, so that one chunk's fp32 logits take about 2**28 bytes."""
    rows = _LOGIT_ELEMENTS_PER_CHUNK // vocab_size
    if rows >= 8:
        # A multiple of 8 keeps the chunk matmuls on tensor-core-friendly shapes.
        return rows - rows % 8
    return max(1, rows)


def _chunk_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (0 where ignored), logsumexp, and the ignored rows' labels replaced by 0 for gathers."""
    labelled = labels != IGNORE_INDEX
    targets = torch.where(labelled, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return torch.where(labelled, lse - target_logits, 0.0), lse, targets


def _real_vocab(weight: torch.Tensor, bias: torch.Tensor | None,
                vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    return weight[:vocab], None if bias is None else bias[:vocab], vocab


def _forward_only(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                  scale: float, softcap: float | None, vocab_size: int | None, chunk_size: int | None,
                  logits_consumer: LogitsConsumer | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and logsumexp [N], chunk by chunk, with no gradient bookkeeping."""
    weight, bias, vocab = _real_vocab(weight, bias, vocab_size)
    hidden, weight = _common_dtype(hidden, weight)
    rows = chunk_size or default_chunk_rows(vocab)
    losses, lses = [], []
    for start in range(0, hidden.shape[0], rows):
        chunk_labels = labels[start:start + rows]
        logits = finish_head((hidden[start:start + rows] @ weight.T).float(), bias, scale, softcap)
        if logits_consumer is not None:
            logits_consumer(logits, chunk_labels)
        loss, lse, _ = _chunk_losses(logits, chunk_labels)
        losses.append(loss)
        lses.append(lse)
    return torch.cat(losses), torch.cat(lses)


def _common_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A bf16 hidden state against fp32 weights (or the reverse) must meet in one dtype for the matmul; the wider
    # one keeps every bit either side had. The casts are no-ops in the usual case of matching dtypes.
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def _logit_gradients(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                     scale: float, softcap: float | None,
                     z_loss_coefficient: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of the chunk's summed CE and summed z-loss with respect to the pre-scale logits `hidden @ W.T + b`."""
    labelled = (labels != IGNORE_INDEX).float().unsqueeze(1)
    probs = torch.exp(logits - lse.unsqueeze(1))
    d_ce = probs * labelled
    d_ce = d_ce.scatter_add(1, targets.unsqueeze(1), -labelled)
    # d(lse^2)/dz = 2 lse softmax(z): the z-loss pushes every logit down in proportion to its probability.
    d_z = probs * (2.0 * z_loss_coefficient * lse.unsqueeze(1) * labelled) if z_loss_coefficient else None
    # Chain rule back through the cap and the scale. With z = c*tanh(u/c), dz/du = 1 - tanh^2 = 1 - (z/c)^2,
    # computed from the capped logits so that tanh need not be kept.
    chain = scale * (1.0 - (logits / softcap).square()) if softcap is not None else scale
    if softcap is not None or scale != 1.0:
        d_ce = d_ce * chain
        d_z = None if d_z is None else d_z * chain
    return d_ce, d_z


def _chunk_maths(raw_logits: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, scale: float,
                 softcap: float | None, z_loss_coefficient: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Everything one chunk needs between its two matmuls: from its fp32 `hidden @ W.T`, the summed CE, the summed
    logsumexp² over labelled rows, and the gradients of both with respect to the pre-scale logits."""
    logits = finish_head(raw_logits, bias, scale, softcap)
    losses, lse, targets = _chunk_losses(logits, labels)
    lse_square = torch.where(labels != IGNORE_INDEX, lse.square(), 0.0).sum()
    d_ce, d_z = _logit_gradients(logits, lse, targets, labels, scale, softcap, z_loss_coefficient)
    return losses.sum(), lse_square, d_ce, d_z


_COMPILED_CHUNK_MATHS: list[Callable[..., Any]] = []


def _chunk_maths_for(device: torch.device) -> Callable[..., Any]:
    """On a GPU, the chunk maths compiled on its own: a few fused kernels per chunk, one graph that every
    full-size chunk reuses. The chunk loop itself stays out of any enclosing compiled graph (see
    linear_cross_entropy), so that each chunk's buffers are freed before the next one starts."""
    if device.type != "cuda":
        return _chunk_maths
    if not _COMPILED_CHUNK_MATHS:
        _COMPILED_CHUNK_MATHS.append(torch.compile(_chunk_maths, dynamic=False))
    return _COMPILED_CHUNK_MATHS[0]


class _InputGradients:
    """The gradients of one loss output with respect to hidden, weight and bias, filled in chunk by chunk."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab: int,
                 needs: tuple[bool, bool, bool]) -> None:
        self.vocab = vocab
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        # Weight and bias gradients are sums over every chunk: fp32 keeps a bf16 run from rounding each addition.
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        self.bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] else None

    def add_chunk(self, d_logits: torch.Tensor, start: int, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        """Adds one chunk; `hidden` is the chunk's rows, `weight` the real-vocabulary rows, both in matmul dtype."""
        d_matmul = d_logits.to(hidden.dtype)
        if self.hidden is not None:
            self.hidden[start:start + hidden.shape[0]] = d_matmul @ weight
        if self.weight is not None:
            self.weight[:self.vocab] += d_matmul.T @ hidden
        if self.bias is not None:
            self.bias[:self.vocab] += d_logits.sum(0)

    def finished(self, weight_dtype: torch.dtype, bias_dtype: torch.dtype | None) -> list[torch.Tensor | None]:
        weight = None if self.weight is None else self.weight.to(weight_dtype)
        bias = None if self.bias is None else self.bias.to(bias_dtype)
        return [self.hidden, weight, bias]


def _scaled_sum(parts: list[torch.Tensor | None], grads: list[torch.Tensor]) -> torch.Tensor | None:
    if parts[0] is None:
        return None
    total = parts[0] * grads[0]
    for part, grad in zip(parts[1:], grads[1:]):
        total = total + part * grad
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Returns (summed CE, summed z-loss) and keeps their input gradients, computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                scale: float, softcap: float | None, vocab_size: int | None, z_loss_coefficient: float,
                chunk_size: int | None, needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        real_weight, real_bias, vocab = _real_vocab(weight, bias, vocab_size)
        matmul_hidden, matmul_weight = _common_dtype(hidden, real_weight)
        rows = chunk_size or default_chunk_rows(vocab)
        # The two outputs can be weighted differently downstream, so each keeps its own gradients.
        ce_grads = _InputGradients(hidden, weight, bias, vocab, needs)
        z_grads = _InputGradients(hidden, weight, bias, vocab, needs) if z_loss_coefficient else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        lse_square_sum = hidden.new_zeros((), dtype=torch.float32)
        chunk_maths = _chunk_maths_for(hidden.device)
        for start in range(0, hidden.shape[0], rows):
            chunk_hidden, chunk_labels = matmul_hidden[start:start + rows], labels[start:start + rows]
            logits = (chunk_hidden @ matmul_weight.T).float()
            ce, lse_square, d_ce, d_z = chunk_maths(logits, real_bias, chunk_labels, scale, softcap,
                                                     z_loss_coefficient)
            ce_sum, lse_square_sum = ce_sum + ce, lse_square_sum + lse_square
            ce_grads.add_chunk(d_ce, start, chunk_hidden, matmul_weight)
            if z_grads is not None:
                z_grads.add_chunk(d_z, start, chunk_hidden, matmul_weight)
        bias_dtype = None if bias is None else bias.dtype
        saved = ce_grads.finished(weight.dtype, bias_dtype)
        if z_grads is not None:
            saved += z_grads.finished(weight.dtype, bias_dtype)
        ctx.save_for_backward(*saved)
        ctx.has_z_grads = z_grads is not None
        return ce_sum, z_loss_coefficient * lse_square_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: torch.Tensor, grad_z: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        grads = [grad_ce, grad_z] if ctx.has_z_grads else [grad_ce]
        per_input = [[saved[i + 3 * k] for k in range(len(grads))] for i in range(3)]
        hidden, weight, bias = (_scaled_sum(parts, grads) for parts in per_input)
        return hidden, weight, bias, None, None, None, None, None, None, None


# Traced into a whole-model graph, the unrolled chunk loop let the compiler keep every chunk's logits alive at once
# (Llama-1B at 8 × 2048 tokens: 54.6 GiB against 42.8 for the one-piece head, on one H100); so the loop runs
# between compiled regions, with each chunk's maths compiled apart (_chunk_maths_for).
@torch.compiler.disable
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                         vocab_size: int | None = None, z_loss_coefficient: float = 0.0,
                         chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens, and the summed z-loss
    `z_loss_coefficient * sum(logsumexp^2)` over the same tokens, both fp32 scalars.

    hidden is [..., H], weight [V, H] (rows past `vocab_size` are padding), bias [V] or None, labels [...] with
    IGNORE_INDEX for positions without a target. `chunk_size` is tokens per chunk (default `default_chunk_rows`).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).long()  # gather and scatter take int64 indices only
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and any(needs):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, scale, softcap, vocab_size,
                                         z_loss_coefficient, chunk_size, needs)
    losses, lse = _forward_only(hidden, weight, labels, bias, scale, softcap, vocab_size, chunk_size, None)
    lse_square_sum = torch.where(labels != IGNORE_INDEX, lse.square(), 0.0).sum()
    return losses.sum(), z_loss_coefficient * lse_square_sum


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                         vocab_size: int | None = None, chunk_size: int | None = None,
                         logits_consumer: LogitsConsumer | None = None) -> torch.Tensor:
    """Per-token fp32 cross-entropy [N] (0 where ignored) for evaluation, with the head of `linear_cross_entropy`.

    `logits_consumer`, if given, sees each chunk's logits and labels in token order, so metrics that need logits
    work without the full logits ever existing. The result carries no gradient.
    """
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    # Autograd would keep every chunk's logits alive for a backward that evaluation never runs.
    with torch.no_grad():
        losses, _ = _forward_only(hidden, weight, labels, bias, scale, softcap, vocab_size, chunk_size,
                                  logits_consumer)
    return losses

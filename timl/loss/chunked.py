"""A linear head + next-token cross-entropy that never holds the whole [tokens, vocab] logits.

The head is `z = (hidden @ weight.T + bias) * scale`, optionally soft-capped as `softcap * tanh(z / softcap)`.
Rows of `weight` at or past `vocab_size` are vocab padding: they take part in no logit, which is the same as a
-inf logit (zero probability) and leaves their gradient exactly zero.

Training goes through the head in a few large chunks of tokens. Each chunk's gradients are worked out in the
forward, while its logits are at hand, and only the gradients of the inputs are kept for the backward: the backward
is a multiplication by the incoming scalar, and no logits are computed twice. So the head costs the same three
matmuls as the one-piece head, while the [tokens, vocab] logits and their gradient exist one chunk at a time.

The matmuls run in the dtype the model's own head would use (autocast's, or the inputs'), on the whole padded
weight so that their shapes stay tensor-core friendly; the weight is cast once, not once per chunk. The logit maths
between them runs in fp32, compiled into a few fused kernels on a GPU. The weight gradient is summed over chunks
in fp32 (on a GPU straight from the matmul's fp32 accumulator).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from timl.loss.cross_entropy import IGNORE_INDEX, finish_head, mask_vocab_padding, summed_z_loss, token_losses

LogitsConsumer = Callable[[torch.Tensor, torch.Tensor], None]
"""Called with each chunk's fp32 logits [rows, vocab_size] and its labels [rows], e.g. to count correct argmaxes."""

CHUNK_BYTES = 2**29
"""A training chunk's logits, in the matmul dtype (bf16: 2**28 logits), take at most this much. The loss's scratch
is then this twice (the chunk's logits and their gradient) and the fp32 weight gradient; the matmuls keep at least
2048 rows at a 128k vocab, large enough to run at full speed. On one H100 (benchmarks/loss_head.py), 2**30 cost
Llama-1B's head 1.5 GiB more for 0.7 ms less a step, and slowed GPT-2's 4× (Inductor split its reductions)."""

_EVAL_LOGIT_ELEMENTS = 2**26
"""256 MiB of fp32 logits per evaluation chunk (evaluation keeps no gradient buffers, so smaller chunks cost less
speed there)."""


def default_chunk_rows(vocab_size: int) -> int:
    """Evaluation's tokens per chunk, so that one chunk's fp32 logits take about 2**28 bytes."""
    rows = _EVAL_LOGIT_ELEMENTS // vocab_size
    if rows >= 8:
        # A multiple of 8 keeps the chunk matmuls on tensor-core-friendly shapes.
        return rows - rows % 8
    return max(1, rows)


def training_chunk_rows(tokens: int, vocab_rows: int, itemsize: int, chunk_bytes: int | None = None) -> int:
    """Tokens per training chunk, a multiple of 8: the fewest equal chunks whose logits fit in `chunk_bytes`
    (default CHUNK_BYTES), so that every chunk shares one compiled kernel set; else the fewest chunks, the last
    one shorter."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    fewest = max(1, math.ceil(tokens * vocab_rows * itemsize / chunk_bytes))
    for chunks in range(fewest, 2 * fewest + 1):  # chunks that split the tokens exactly, if a few more do it
        if tokens % chunks == 0 and (tokens // chunks) % 8 == 0:
            return tokens // chunks
    rows = math.ceil(tokens / fewest)
    return max(1, min(tokens, math.ceil(rows / 8) * 8))


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the model's own head would multiply in: autocast's when it is on, else the wider of the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _exact_dtypes(device_type: str) -> torch.autocast:
    # The inputs are cast once, by hand; autocast would cast the weight again at every chunk's matmul.
    return torch.autocast(device_type, enabled=False)


def _chunk_maths(raw_logits: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, scale: float,
                 softcap: float | None, vocab: int, z_loss_coefficient: float, grad_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, ...]:
    """Everything one training chunk needs between its matmuls, from its `hidden @ W.T` [rows, weight rows]: the
    summed CE, the summed z-loss, the gradients of both with respect to `hidden @ W.T` (in `grad_dtype`, zero in
    padding columns), and, with a bias, their fp32 column sums."""
    capped = finish_head(raw_logits.float(), bias, scale, softcap)
    logits = mask_vocab_padding(capped, vocab)
    losses, lse = token_losses(logits, labels)
    labelled = (labels != IGNORE_INDEX).unsqueeze(1)
    targets = torch.where(labelled, labels.unsqueeze(1), 0)
    probs = torch.exp(logits - lse.unsqueeze(1))
    # d(CE)/dz = softmax(z) - onehot(target), on labelled rows; written pointwise so that it fuses.
    columns = torch.arange(logits.shape[1], device=logits.device)
    d_ce = torch.where(labelled, torch.where(columns == targets, probs - 1.0, probs), 0.0)
    # d(lse^2)/dz = 2 lse softmax(z): the z-loss pushes every logit down in proportion to its probability.
    d_z = torch.where(labelled, probs * (2.0 * z_loss_coefficient) * lse.unsqueeze(1), 0.0) \
        if z_loss_coefficient else None
    # Back through the cap and the scale. With z = c*tanh(u/c), dz/du = 1 - tanh^2 = 1 - (z/c)^2, taken from the
    # capped logits before padding is masked, so that it stays finite where the gradient is zero.
    if softcap is not None or scale != 1.0:
        chain = scale * (1.0 - (capped / softcap).square()) if softcap is not None else scale
        d_ce = d_ce * chain
        d_z = None if d_z is None else d_z * chain
    z_loss = summed_z_loss(lse, labels, z_loss_coefficient)
    outputs = [losses.sum(), z_loss, d_ce.to(grad_dtype), None if d_z is None else d_z.to(grad_dtype)]
    if bias is not None:
        outputs += [d_ce.sum(0), None if d_z is None else d_z.sum(0)]
    return tuple(outputs)


_COMPILED_CHUNK_MATHS: list[Callable[..., Any]] = []


def _chunk_maths_for(device: torch.device) -> Callable[..., Any]:
    """On a GPU, the chunk maths compiled on its own: a few fused kernels that read each chunk's logits twice and
    write its gradient once, one graph for every full-size chunk. The chunk loop itself stays out of any enclosing
    compiled graph (see chunked_linear_cross_entropy), so that each chunk's buffers are freed before the next one
    starts."""
    if device.type != "cuda":
        return _chunk_maths
    if not _COMPILED_CHUNK_MATHS:
        _COMPILED_CHUNK_MATHS.append(torch.compile(_chunk_maths, dynamic=False))
    return _COMPILED_CHUNK_MATHS[0]


def _add_product(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a @ b in fp32, for a and b in the matmul dtype; the first call (total None) makes the total."""
    if a.dtype == torch.float32:
        return a @ b if total is None else total.addmm_(a, b)
    if a.is_cuda:
        # cuBLAS adds into the fp32 total from its fp32 accumulator: no rounded product, no extra pass.
        if total is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    product = (a @ b).float()
    return product if total is None else total.add_(product)


class _InputGradients:
    """The gradients of one loss output with respect to hidden, weight and bias, filled in chunk by chunk."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                 needs: tuple[bool, bool, bool]) -> None:
        self.needs = needs
        self.hidden = torch.empty(shape, dtype=dtype, device=device) if needs[0] else None
        # Weight and bias gradients are sums over every chunk, kept in fp32.
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def add_chunk(self, d_logits: torch.Tensor, d_bias: torch.Tensor | None, rows: slice, hidden: torch.Tensor,
                  weight: torch.Tensor) -> None:
        """Adds one chunk; `hidden` is the chunk's rows, `weight` the whole weight, both in the matmul dtype."""
        if self.hidden is not None:
            torch.mm(d_logits, weight, out=self.hidden[rows])
        if self.needs[1]:
            self.weight = _add_product(self.weight, d_logits.T, hidden)
        if self.needs[2]:
            self.bias = d_bias if self.bias is None else self.bias.add_(d_bias)

    def finished(self, hidden_dtype: torch.dtype, weight_dtype: torch.dtype,
                 bias_dtype: torch.dtype | None) -> list[torch.Tensor | None]:
        hidden = None if self.hidden is None else self.hidden.to(hidden_dtype)
        weight = None if self.weight is None else self.weight.to(weight_dtype)
        bias = None if self.bias is None else self.bias.to(bias_dtype)
        return [hidden, weight, bias]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Returns (summed CE, summed z-loss) and keeps their input gradients, computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                scale: float, softcap: float | None, vocab_size: int | None, z_loss_coefficient: float,
                chunk_size: int | None, needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = weight.shape[0] if vocab_size is None else vocab_size
        dtype = matmul_dtype(hidden, weight)
        tokens = hidden.shape[0]
        rows = chunk_size or training_chunk_rows(tokens, weight.shape[0], dtype.itemsize)
        # The two outputs can be weighted differently downstream, so each keeps its own gradients.
        ce_grads = _InputGradients(hidden.shape, dtype, hidden.device, needs)
        z_grads = _InputGradients(hidden.shape, dtype, hidden.device, needs) if z_loss_coefficient else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        z_sum = hidden.new_zeros((), dtype=torch.float32)
        chunk_maths = _chunk_maths_for(hidden.device)
        with _exact_dtypes(hidden.device.type):
            matmul_hidden, matmul_weight = hidden.to(dtype), weight.to(dtype)
            for start in range(0, tokens, rows):
                chunk = slice(start, start + rows)
                chunk_hidden = matmul_hidden[chunk]
                ce, z_loss, d_ce, d_z, *d_bias = chunk_maths(
                    chunk_hidden @ matmul_weight.T, bias, labels[chunk], scale, softcap, vocab, z_loss_coefficient,
                    dtype)
                ce_sum, z_sum = ce_sum + ce, z_sum + z_loss
                d_bias = d_bias or [None, None]
                ce_grads.add_chunk(d_ce, d_bias[0], chunk, chunk_hidden, matmul_weight)
                if z_grads is not None:
                    z_grads.add_chunk(d_z, d_bias[1], chunk, chunk_hidden, matmul_weight)
        dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        saved = ce_grads.finished(*dtypes)
        if z_grads is not None:
            saved += z_grads.finished(*dtypes)
        ctx.save_for_backward(*saved)
        ctx.has_z_grads = z_grads is not None
        ctx.used = False
        return ce_sum, z_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: torch.Tensor, grad_z: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("timl's chunked loss scales its saved gradients in place: it supports one backward "
                               "per forward (no retain_graph=True).")
        ctx.used = True
        saved = ctx.saved_tensors
        grads = [grad_ce, grad_z] if ctx.has_z_grads else [grad_ce]
        results = []
        for i in range(3):
            parts = [saved[i + 3 * k] for k in range(len(grads))]
            if parts[0] is None:
                results.append(None)
                continue
            # In place: these buffers are the gradients, and a weight-sized copy would cost a gigabyte at 128k vocab.
            total = parts[0].mul_(grads[0])
            for part, grad in zip(parts[1:], grads[1:]):
                total.add_(part.mul_(grad))
            results.append(total)
        return (*results, None, None, None, None, None, None, None)


def _forward_only(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                  scale: float, softcap: float | None, vocab_size: int | None, chunk_size: int | None,
                  logits_consumer: LogitsConsumer | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and logsumexp [N], chunk by chunk, with no gradient bookkeeping."""
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    bias = None if bias is None else bias[:vocab]
    dtype = matmul_dtype(hidden, weight)
    rows = chunk_size or default_chunk_rows(vocab)
    losses, lses = [], []
    with _exact_dtypes(hidden.device.type):
        matmul_hidden, matmul_weight = hidden.to(dtype), weight.to(dtype)
        for start in range(0, hidden.shape[0], rows):
            chunk_labels = labels[start:start + rows]
            raw = (matmul_hidden[start:start + rows] @ matmul_weight.T)[:, :vocab]
            logits = finish_head(raw.float(), bias, scale, softcap)
            if logits_consumer is not None:
                logits_consumer(logits, chunk_labels)
            loss, lse = token_losses(logits, chunk_labels)
            losses.append(loss)
            lses.append(lse)
    return torch.cat(losses), torch.cat(lses)


# Traced into a whole-model graph, the unrolled chunk loop let the compiler keep every chunk's logits alive at once
# (Llama-1B at 8 × 2048 tokens: 54.6 GiB against 42.8 for the one-piece head, on one H100); so the loop runs
# between compiled regions, with each chunk's maths compiled apart (_chunk_maths_for).
@torch.compiler.disable
def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                                 vocab_size: int | None = None, z_loss_coefficient: float = 0.0,
                                 chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens, and the summed z-loss
    `z_loss_coefficient * sum(logsumexp^2)` over the same tokens, both fp32 scalars.

    hidden is [..., H], weight [V, H] (rows past `vocab_size` are padding), bias [V] or None, labels [...] with
    IGNORE_INDEX for positions without a target. `chunk_size` is tokens per chunk (default: `training_chunk_rows`
    when gradients are needed, else `default_chunk_rows`). One backward per forward.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).long()  # gather takes int64 indices only
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and any(needs):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, scale, softcap, vocab_size,
                                                z_loss_coefficient, chunk_size, needs)
    losses, lse = _forward_only(hidden, weight, labels, bias, scale, softcap, vocab_size, chunk_size, None)
    return losses.sum(), summed_z_loss(lse, labels, z_loss_coefficient)


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                         vocab_size: int | None = None, chunk_size: int | None = None,
                         logits_consumer: LogitsConsumer | None = None) -> torch.Tensor:
    """Per-token fp32 cross-entropy [N] (0 where ignored) for evaluation, with the head of
    `chunked_linear_cross_entropy`.

    `logits_consumer`, if given, sees each chunk's logits and labels in token order, so metrics that need logits
    work without the full logits ever existing. The result carries no gradient.
    """
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    # Autograd would keep every chunk's logits alive for a backward that evaluation never runs.
    with torch.no_grad():
        losses, _ = _forward_only(hidden, weight, labels, bias, scale, softcap, vocab_size, chunk_size,
                                  logits_consumer)
    return losses

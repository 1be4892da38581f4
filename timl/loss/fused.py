"""The fused linear + cross-entropy kernels of Liger and Cut Cross-Entropy, as timl loss paths: each takes the
arguments of timl.loss.cross_entropy.linear_cross_entropy and returns the same (summed cross-entropy, summed z-loss).

  cut_cross_entropy  Cut Cross-Entropy's linear_cross_entropy (bf16 inputs). Its own "cce" kernel filters small
                     gradient terms; measured against an fp32 reference it misses the 1e-2 gradient bound
                     (benchmarks/RESULTS.md), so timl defaults to its impl="torch_compile", which meets it. Pass
                     --cut_cross_entropy_kwargs '{"impl": "cce"}' to trade accuracy for memory.
  liger              Liger's fused linear cross-entropy; it breaks the compiled graph, so it runs outside it.

Both reproduce the model's head (see timl.model.head.Head): a logit scale is folded into the hidden states, a bias
into Liger's bias or, for Cut Cross-Entropy, into an extra column of ones; both take the softcap. Padded vocab rows
never receive probability mass: they are sliced off, or get a -inf bias where no softcap would turn it finite.
Whether a kernel can run here, and which path runs, is timl.loss.select's to decide.
"""

from __future__ import annotations

from typing import Any

import torch

from timl.loss.cross_entropy import IGNORE_INDEX, mask_vocab_padding

DEFAULT_CCE_KWARGS = {"impl": "torch_compile"}


def cce_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             bias: torch.Tensor | None, scale: float, softcap: float | None, vocab_size: int,
                             z_loss_coefficient: float, **kernel_options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The cut_cross_entropy path; `kernel_options` go to Cut Cross-Entropy's linear_cross_entropy."""
    from cut_cross_entropy import linear_cross_entropy as cut_cross_entropy

    if z_loss_coefficient:
        raise ValueError("Cut Cross-Entropy has no z-loss: use another loss path with --z_loss_coefficient.")
    # It takes bf16 only; the weight's first vocab_size rows are a contiguous view, so nothing is copied twice.
    hidden, weight = _scaled(hidden.to(torch.bfloat16), scale), weight[:vocab_size].to(torch.bfloat16)
    if bias is not None:
        # (h·s)·Wᵀ + s·b as one matmul: a column of ones in the hidden states meets the bias in the weight.
        hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
        weight = torch.cat([weight, (bias[:vocab_size] * scale).to(weight.dtype).unsqueeze(1)], dim=1)
    loss = cut_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, softcap=softcap, reduction="sum",
                             **{**DEFAULT_CCE_KWARGS, **kernel_options})
    return loss, torch.zeros_like(loss)


def _scaled(hidden: torch.Tensor, scale: float) -> torch.Tensor:
    return hidden if scale == 1.0 else hidden * scale


@torch.compiler.disable
def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None, scale: float, softcap: float | None, vocab_size: int,
                               z_loss_coefficient: float, **kernel_options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The liger path; `kernel_options` go to Liger's LigerFusedLinearCrossEntropyLoss."""
    # Liger's kernel calls .item() and cannot be traced, so it runs eagerly between compiled regions.
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    if bias is not None:
        bias = bias * scale
    if weight.shape[0] > vocab_size:
        if softcap is not None:  # a softcap would turn a -inf bias into -softcap: drop the padded rows instead
            weight, bias = weight[:vocab_size], None if bias is None else bias[:vocab_size]
        else:
            padding = mask_vocab_padding(weight.new_zeros(weight.shape[0]), vocab_size)
            bias = padding if bias is None else bias.to(weight.dtype) + padding
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", return_z_loss=True,
                                            lse_square_scale=z_loss_coefficient, softcap=softcap, **kernel_options)
    output = loss(weight, _scaled(hidden, scale).to(weight.dtype), labels,
                  None if bias is None else bias.to(weight.dtype))
    z_loss = output.z_loss if output.z_loss is not None else torch.zeros_like(output.loss)
    # Liger's loss already includes the z-loss; timl keeps the two apart for logging.
    return output.loss - z_loss, z_loss

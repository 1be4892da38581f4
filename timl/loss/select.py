"""The one place that decides how the training loss is computed.

`choose_training_loss` turns what the run asks (a loss path or "auto", a custom loss, train metrics, the FP8 head,
the z-loss, a fused kernel's options) into a `TrainingLoss` (timl/model/forward.py), which the training forward
computes and never second-guesses. It is asked once, when the Trainer is built.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from timl.loss import LOSS_PATHS
from timl.loss.cross_entropy import LossFunction, as_global_share
from timl.model.build import real_vocab_size
from timl.model.forward import TrainingLoss
from timl.model.head import Head, check_head, read_head

logger = logging.getLogger(__name__)

FUSED_PACKAGES = {"liger": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}
"""The package each fused kernel's path needs."""


def fused_kernel_missing(path: str, device: torch.device) -> str | None:
    """Why a fused loss path cannot run here (a missing package, no CUDA), or None when it can."""
    package = FUSED_PACKAGES[path]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install 'timl[{package.replace('_', '-')}]')"
    if device.type != "cuda":
        return f"{package} needs CUDA"
    return None


def choose_training_loss(model: torch.nn.Module, requested: str, device: torch.device,
                         forward_kwargs: dict[str, Any], *, compute_loss_func: LossFunction | None = None,
                         train_metrics: bool = False, fp8_output_head: bool = False, z_loss_coefficient: float = 0.0,
                         cut_cross_entropy_kwargs: dict[str, Any] | None = None) -> TrainingLoss:
    """The loss to train on: its path, the checked head it goes through, its options and z-loss.

    `requested` is a LOSS_PATHS name or "auto" (the fastest exact path: chunked on a GPU, full on the CPU).
    Whatever is asked, a head that does not reproduce the model's own logits sends training to them, said once; so
    do, under "auto", a custom loss (`compute_loss_func`), train metrics and an FP8 head, which need the
    logits (a path asked for by name that makes none is refused instead, except for train metrics, then skipped);
    an unavailable fused kernel falls back to "auto", said once.
    """
    if requested not in ("auto", *LOSS_PATHS):
        raise ValueError(f"Unknown loss path {requested!r}; the paths are auto, {', '.join(LOSS_PATHS)}.")
    needed_by = "the custom compute_loss_func" if compute_loss_func is not None else None
    if train_metrics and requested == "auto":
        needed_by = needed_by or "the train metrics"
    if fp8_output_head:
        needed_by = needed_by or "an FP8 head (--fp8)"
    path, head = _path_and_head(model, requested, device, forward_kwargs, needed_by)
    if path != "logits" and train_metrics:
        logger.warning("The %s loss path makes no logits, so train metrics are skipped; they still run at eval.", path)
    options = dict(cut_cross_entropy_kwargs or {}) if path == "cut_cross_entropy" else {}
    loss_function = as_global_share(compute_loss_func) if compute_loss_func is not None else None
    return TrainingLoss(path, head, z_loss_coefficient, options, loss_function)


def _path_and_head(model: torch.nn.Module, requested: str, device: torch.device, forward_kwargs: dict[str, Any],
                   logits_needed_by: str | None) -> tuple[str, Head | None]:
    """The path to train on and the checked head it goes through (None for the model's own logits)."""
    if requested in FUSED_PACKAGES:
        reason = fused_kernel_missing(requested, device)
        if reason:
            logger.warning("%s: training on the default loss path instead.", reason)
            requested = "auto"
    if requested == "logits":
        return "logits", None
    if logits_needed_by:
        if requested != "auto":
            raise ValueError(f"The {requested} loss path makes no logits, which {logits_needed_by} needs: drop "
                             f"one of them.")
        return "logits", None
    head = read_head(model)
    if head is None:
        if requested != "auto":
            raise ValueError(f"The {requested} loss path needs the model's hidden states and output weight: a Hugging "
                             f"Face causal LM, or a model with `hidden_states(input_ids)` and `output_weight`.")
        return "logits", None
    mismatch = check_head(model, head, forward_kwargs, real_vocab_size(model))
    if mismatch:
        logger.warning("Training on the model's own logits, not the %s loss path: %s. The loss is exact; only the "
                       "memory and speed of a fused head are lost.", requested, mismatch)
        return "logits", None
    if requested == "auto":
        # On a GPU the chunked head is as fast as the one-piece head and holds a fraction of its memory
        # (benchmarks/loss_head.py); on the CPU, where its chunk maths runs uncompiled, the one-piece head is faster.
        requested = "chunked" if device.type == "cuda" else "full"
    return requested, head

"""Faster paths behind the same interface as the plain one: fused losses, Liger's modules and vocab padding.

The fused losses work for any causal LM: the decoder runs to its last hidden states, and a fused linear +
cross-entropy kernel takes them with the output embedding, so full logits never exist in training.

  torch              logits = hidden @ W.T, then cross-entropy; under torch.compile both fuse into a few kernels
  cut_cross_entropy  Cut Cross-Entropy's linear_cross_entropy (bf16 inputs). Its own "cce" kernel filters small
                     gradient terms; measured against an fp32 reference it misses the 1e-2 gradient bound
                     (benchmarks/RESULTS.md), so timl defaults to its impl="torch_compile", which meets it. Pass
                     --cut_cross_entropy_kwargs '{"impl": "cce"}' to trade accuracy for memory.
  liger              Liger's fused linear cross-entropy; it breaks the compiled graph, so it runs outside it.

Padded vocab rows (see pad_vocab) never receive probability mass: the torch path masks their logits, Liger gets a
-inf bias for them, and Cut Cross-Entropy sees only the real rows.
"""

from __future__ import annotations

import importlib.util
import logging
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from timl.loader import IGNORE_INDEX

logger = logging.getLogger(__name__)

DEFAULT_CCE_KWARGS = {"impl": "torch_compile"}


def real_vocab_size(model: torch.nn.Module) -> int | None:
    """The vocab without padding, from the config (an object or, for custom models, a dict), if it says."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return config.get("unpadded_vocab_size") or config.get("vocab_size")
    return getattr(config, "unpadded_vocab_size", None) or getattr(config, "vocab_size", None)


def pad_vocab(model: torch.nn.Module, multiple: int) -> None:
    """Pads the embeddings (and a tied or untied output head) to a multiple of `multiple` rows, for faster matmuls.

    The config then states the padded size, so checkpoints load with from_pretrained; `unpadded_vocab_size` keeps
    the real one, which the losses and metrics use.
    """
    real = real_vocab_size(model)
    if real is None or real % multiple == 0:
        return
    model.resize_token_embeddings(real, pad_to_multiple_of=multiple, mean_resizing=False)
    model.config.unpadded_vocab_size = real
    logger.info("Padded the vocab from %d to %d rows.", real, model.config.vocab_size)


def choose_loss_path(use_liger_kernel: bool, use_cut_cross_entropy: bool, device: torch.device) -> str:
    """The loss path to train on; a missing package or CUDA is said once and falls back to the plain path."""
    if use_liger_kernel and use_cut_cross_entropy:
        raise ValueError("--use_liger_kernel and --use_cut_cross_entropy both ask for the fused loss: pick one.")
    wanted = "liger" if use_liger_kernel else "cut_cross_entropy" if use_cut_cross_entropy else "torch"
    if wanted == "torch":
        return wanted
    package = {"liger": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}[wanted]
    if importlib.util.find_spec(package) is None:
        logger.warning("%s is not installed (pip install 'timl[%s]'): training on the plain torch loss.",
                       package, package.replace("_", "-"))
        return "torch"
    if device.type != "cuda":
        logger.warning("%s needs CUDA: training on the plain torch loss.", package)
        return "torch"
    return wanted


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                             path: str = "torch", kwargs: dict[str, Any] | None = None,
                             z_loss_coefficient: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of hidden @ weight.T against labels (already shifted), over the first
    `vocab_size` rows of weight (rows beyond are padding); and the summed z-loss, coefficient × logsumexp²."""
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    kwargs = kwargs or {}
    vocab_size = vocab_size or weight.shape[0]
    if path == "torch":
        logits = (hidden @ weight.T).float()
        if weight.shape[0] > vocab_size:
            # Out of place, so that the compiler fuses the mask into the cross-entropy instead of keeping fp32 logits.
            padding = torch.arange(weight.shape[0], device=logits.device) >= vocab_size
            logits = logits.masked_fill(padding, float("-inf"))
        return cross_entropy_and_z_loss(logits, labels, z_loss_coefficient)
    if path == "cut_cross_entropy":
        from cut_cross_entropy import linear_cross_entropy

        if z_loss_coefficient:
            raise ValueError("Cut Cross-Entropy has no z-loss: use the torch or Liger loss with --z_loss_coefficient.")
        # It takes bf16 only; the weight's first vocab_size rows are a contiguous view, so nothing is copied twice.
        loss = linear_cross_entropy(hidden.to(torch.bfloat16), weight[:vocab_size].to(torch.bfloat16), labels,
                                    ignore_index=IGNORE_INDEX, reduction="sum", **{**DEFAULT_CCE_KWARGS, **kwargs})
        return loss, torch.zeros_like(loss)
    if path == "liger":
        return _liger_loss_sum(hidden, weight, labels, vocab_size, kwargs, z_loss_coefficient)
    raise ValueError(f"Unknown loss path {path!r}.")


def cross_entropy_and_z_loss(logits: torch.Tensor, labels: torch.Tensor,
                             z_loss_coefficient: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of [tokens, vocab] logits, and the summed z-loss over the labelled tokens."""
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if not z_loss_coefficient:
        return cross_entropy, torch.zeros_like(cross_entropy)
    log_normalizers = torch.logsumexp(logits, dim=-1)
    z_loss = z_loss_coefficient * (log_normalizers.square() * (labels != IGNORE_INDEX)).sum()
    return cross_entropy, z_loss


@torch.compiler.disable
def _liger_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                    kwargs: dict[str, Any], z_loss_coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Liger's kernel calls .item() and cannot be traced, so it runs eagerly between compiled regions.
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    bias = None
    if weight.shape[0] > vocab_size:
        bias = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
        bias[vocab_size:] = float("-inf")
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", return_z_loss=True,
                                            lse_square_scale=z_loss_coefficient, **kwargs)
    output = loss(weight, hidden.to(weight.dtype), labels, bias)
    z_loss = output.z_loss if output.z_loss is not None else torch.zeros_like(output.loss)
    # Liger's loss already includes the z-loss; timl keeps the two apart for logging.
    return output.loss - z_loss, z_loss


def apply_liger(model: torch.nn.Module, kwargs: dict[str, Any]) -> list[str]:
    """Liger's kernels for the model's own modules: its patch API where it knows the model type, else (GPT-2, when
    asked) its LayerNorm in place of torch's. The loss is timl's fused path. Returns what was applied."""
    from liger_kernel.transformers import monkey_patch

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        settings = {**kwargs, "cross_entropy": False, "fused_linear_cross_entropy": False}
        monkey_patch._apply_liger_kernel_to_instance(model=model, **settings)
        return [f"liger patch for {model_type}"]
    if not kwargs.get("layer_norm", False):
        # Measured on GPT-2 (benchmarks/RESULTS.md): Liger's LayerNorm breaks the compiled graph and costs more than
        # it saves, so for models outside Liger's API it is opt-in: --liger_kernel_kwargs '{"layer_norm": true}'.
        return []
    from liger_kernel.transformers.layer_norm import LigerLayerNorm

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.LayerNorm and len(child.normalized_shape) == 1:
                liger = LigerLayerNorm(child.normalized_shape[0], eps=child.eps, bias=child.bias is not None)
                liger.to(child.weight.device)
                liger.weight = child.weight
                if child.bias is not None:
                    liger.bias = child.bias
                setattr(parent, name, liger)
                replaced += 1
    return [f"liger LayerNorm x{replaced}"] if replaced else []


class CausalLMForTraining(torch.nn.Module):
    """Wraps a causal LM so that one forward returns the training loss: what DDP wraps and torch.compile compiles,
    so the loss is compiled together with the model.

    With a fused path, the decoder's last hidden states go straight into the fused loss (`base_model` must return
    them, as every Hugging Face causal LM's does) and no outputs are returned. Otherwise the model's logits (padding
    columns dropped) go to `loss_function(outputs, inputs, num_items_in_batch)`, and the outputs come back for the
    train metrics when `return_outputs` is set.
    """

    def __init__(self, model: torch.nn.Module, loss_function: Any, loss_path: str | None,
                 loss_kwargs: dict[str, Any], forward_kwargs: dict[str, Any], return_outputs: bool,
                 z_loss_coefficient: float = 0.0):
        super().__init__()
        self.model = model
        self.loss_function, self.loss_path, self.loss_kwargs = loss_function, loss_path, loss_kwargs
        self.z_loss_coefficient = z_loss_coefficient
        # Training never reuses past keys and values: building the cache would only cost memory.
        self.forward_kwargs = {"use_cache": False, **forward_kwargs} if _has_cache(model) else forward_kwargs
        self.return_outputs = return_outputs
        self.vocab_size = real_vocab_size(model)

    def forward(self, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Returns this micro-batch's share of the global loss (z-loss included), of the z-loss alone, and the
        outputs when asked for."""
        if self.loss_path is not None:
            hidden = hidden_states(self.model, inputs["input_ids"], self.forward_kwargs)
            cross_entropy, z_loss = linear_cross_entropy_sum(
                hidden, output_weight(self.model), inputs["labels"], self.vocab_size, self.loss_path,
                self.loss_kwargs, self.z_loss_coefficient)
            return (cross_entropy + z_loss) / num_items_in_batch, z_loss.detach() / num_items_in_batch, None
        outputs = logits_outputs(self.model, inputs["input_ids"], self.forward_kwargs, self.vocab_size)
        loss = self.loss_function(outputs, inputs, num_items_in_batch)
        z_loss = torch.zeros_like(loss)
        if self.z_loss_coefficient:
            _, z_loss = cross_entropy_and_z_loss(outputs.logits.flatten(0, -2).float(), inputs["labels"].flatten(),
                                                 self.z_loss_coefficient)
            z_loss = z_loss / num_items_in_batch
        return loss + z_loss, z_loss.detach(), outputs if self.return_outputs else None


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, forward_kwargs: dict[str, Any]) -> torch.Tensor:
    """The decoder's last hidden states: a custom model's `hidden_states(input_ids)`, or a Hugging Face model's
    base model output."""
    if hasattr(model, "hidden_states"):
        return model.hidden_states(input_ids, **forward_kwargs)
    return model.base_model(input_ids=input_ids, **forward_kwargs).last_hidden_state


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output projection's weight, [vocab, hidden]."""
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return model.get_output_embeddings().weight
    return model.output_weight


def supports_fused_loss(model: torch.nn.Module) -> bool:
    """Whether the model exposes what the fused losses need: its hidden states and output weight."""
    hf = hasattr(model, "base_model") and getattr(model, "get_output_embeddings", lambda: None)() is not None
    return hf or (hasattr(model, "hidden_states") and hasattr(model, "output_weight"))


def _has_cache(model: torch.nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")


def logits_outputs(model: torch.nn.Module, input_ids: torch.Tensor, forward_kwargs: dict[str, Any],
                   vocab_size: int | None) -> Any:
    """The model's outputs (with `.logits`), with the logits of padded vocab rows dropped."""
    if _has_cache(model):
        forward_kwargs = {"use_cache": False, **forward_kwargs}
    outputs = model(input_ids=input_ids, **forward_kwargs)
    if isinstance(outputs, torch.Tensor):  # a custom model that returns its logits
        outputs = SimpleNamespace(logits=outputs)
    if vocab_size is not None and outputs.logits.shape[-1] > vocab_size:
        outputs.logits = outputs.logits[..., :vocab_size]
    return outputs

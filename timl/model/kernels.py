"""Optional kernels, each behind the same interface as the plain path: the fused linear + cross-entropy losses of
Liger and Cut Cross-Entropy, and Liger's modules for the architectures it knows.

  cut_cross_entropy  Cut Cross-Entropy's linear_cross_entropy (bf16 inputs). Its own "cce" kernel filters small
                     gradient terms; measured against an fp32 reference it misses the 1e-2 gradient bound
                     (benchmarks/RESULTS.md), so timl defaults to its impl="torch_compile", which meets it. Pass
                     --cut_cross_entropy_kwargs '{"impl": "cce"}' to trade accuracy for memory.
  liger              Liger's fused linear cross-entropy; it breaks the compiled graph, so it runs outside it.

Both reproduce the model's head (see timl.model.build.Head): a logit scale is folded into the hidden states, a bias
into Liger's bias or, for Cut Cross-Entropy, into an extra column of ones; both take the softcap. Padded vocab rows
never receive probability mass: they are sliced off, or get a -inf bias where no softcap would turn it finite.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Any

import torch

from timl.loss.cross_entropy import IGNORE_INDEX

logger = logging.getLogger(__name__)

DEFAULT_CCE_KWARGS = {"impl": "torch_compile"}
PACKAGES = {"liger": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}


def available(path: str, device: torch.device) -> str | None:
    """Why a fused loss path cannot run here (a missing package, no CUDA), or None when it can."""
    package = PACKAGES[path]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install 'timl[{package.replace('_', '-')}]')"
    if device.type != "cuda":
        return f"{package} needs CUDA"
    return None


def cut_cross_entropy_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None, scale: float, softcap: float | None, vocab_size: int,
                               z_loss_coefficient: float, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from cut_cross_entropy import linear_cross_entropy

    if z_loss_coefficient:
        raise ValueError("Cut Cross-Entropy has no z-loss: use another loss path with --z_loss_coefficient.")
    # It takes bf16 only; the weight's first vocab_size rows are a contiguous view, so nothing is copied twice.
    hidden, weight = _scaled(hidden.to(torch.bfloat16), scale), weight[:vocab_size].to(torch.bfloat16)
    if bias is not None:
        # (h·s)·Wᵀ + s·b as one matmul: a column of ones in the hidden states meets the bias in the weight.
        hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
        weight = torch.cat([weight, (bias[:vocab_size] * scale).to(weight.dtype).unsqueeze(1)], dim=1)
    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, softcap=softcap,
                                reduction="sum", **{**DEFAULT_CCE_KWARGS, **kwargs})
    return loss, torch.zeros_like(loss)


def _scaled(hidden: torch.Tensor, scale: float) -> torch.Tensor:
    return hidden if scale == 1.0 else hidden * scale


@torch.compiler.disable
def liger_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   bias: torch.Tensor | None, scale: float, softcap: float | None, vocab_size: int,
                   z_loss_coefficient: float, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    # Liger's kernel calls .item() and cannot be traced, so it runs eagerly between compiled regions.
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    if bias is not None:
        bias = bias * scale
    if weight.shape[0] > vocab_size:
        if softcap is not None:  # a softcap would turn a -inf bias into -softcap: drop the padded rows instead
            weight, bias = weight[:vocab_size], None if bias is None else bias[:vocab_size]
        else:
            padding = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
            padding[vocab_size:] = float("-inf")
            bias = padding if bias is None else bias.to(weight.dtype) + padding
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", return_z_loss=True,
                                            lse_square_scale=z_loss_coefficient, softcap=softcap, **kwargs)
    output = loss(weight, _scaled(hidden, scale).to(weight.dtype), labels, None if bias is None else bias.to(weight.dtype))
    z_loss = output.z_loss if output.z_loss is not None else torch.zeros_like(output.loss)
    # Liger's loss already includes the z-loss; timl keeps the two apart for logging.
    return output.loss - z_loss, z_loss


def apply_liger(model: torch.nn.Module, kwargs: dict[str, Any]) -> list[str]:
    """Liger's kernels for the model's own modules: its patch API where it knows the model type, else (GPT-2, when
    asked) its LayerNorm in place of torch's. The loss is timl's fused path. Returns what was applied."""
    from liger_kernel.transformers import monkey_patch

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        # The loss stays timl's, which knows the model's head; Liger patches the rest.
        settings = {**kwargs, "cross_entropy": False, "fused_linear_cross_entropy": False}
        patch = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
        parameters = inspect.signature(patch).parameters
        settings = {name: value for name, value in settings.items() if name in parameters}
        patched = [name for name, parameter in parameters.items()
                   if settings.get(name, parameter.default) is True]
        monkey_patch._apply_liger_kernel_to_instance(model=model, **settings)
        return [f"liger for {model_type}: {', '.join(patched) or 'nothing'}"]
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


def apply_fp8(model: torch.nn.Module, recipe: str, device: torch.device, output_head: bool = False) -> str:
    """Converts the decoder's linear layers to torchao's float8 training (`recipe`: tensorwise or rowwise). The
    output head stays in bf16 (its logits feed the loss) unless `output_head`; layers whose sizes are not multiples
    of 16, which the FP8 matmul needs, always do."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise ValueError(f"--fp8 {recipe} needs a GPU with FP8 tensor cores (compute capability 8.9 or more: H100, "
                         f"H200, L40S, B200); this run is on {name}.")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("--fp8 needs torchao: pip install torchao")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_head and not isinstance(head, torch.nn.Linear):
        raise ValueError(f"--fp8_output_head: {type(model).__name__}'s output head is "
                         f"{type(head).__name__ if head is not None else 'missing'}, not a torch.nn.Linear")
    if output_head:
        head = None

    def convertible(module: torch.nn.Module, name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and module is not head
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    converted = sum(convertible(module, name) for name, module in model.named_modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=convertible)
    return f"fp8 {recipe} on {converted} linear layers" + (", the output head among them" if output_head else "")

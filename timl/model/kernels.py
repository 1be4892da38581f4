"""Optional kernels that patch the model, each behind the same interface as the plain path: Liger's modules for the
architectures it knows, and torchao's FP8 training. The fused loss kernels are loss paths: timl.loss.fused.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import torch


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
    """Converts the decoder's linear layers to torchao's float8 training (`recipe`: tensorwise or rowwise), on a GPU
    that can run them; convert_to_fp8 says which layers. Returns what was applied."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise ValueError(f"--fp8 {recipe} needs a GPU with FP8 tensor cores (compute capability 8.9 or more: H100, "
                         f"H200, L40S, B200); this run is on {name}.")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("--fp8 needs torchao: pip install torchao")
    converted = convert_to_fp8(model, recipe, output_head)
    return f"fp8 {recipe} on {len(converted)} linear layers" + (", the output head among them" if output_head else "")


def convert_to_fp8(model: torch.nn.Module, recipe: str, output_head: bool = False) -> list[str]:
    """Swaps the layers that fp8_module_filter picks for torchao's Float8Linear under `recipe`'s scaling. Only their
    forward needs FP8 tensor cores, so which layers convert, and how, can be checked on the CPU. Returns their names."""
    convertible = fp8_module_filter(model, output_head)
    converted = [name for name, module in model.named_modules() if convertible(module, name)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not [name for name in converted if model.get_submodule(name) is not head]:
        raise ValueError(f"--fp8 {recipe}: {type(model).__name__} has no layer in its decoder that FP8 can take (a "
                         f"torch.nn.Linear whose sizes are multiples of 16; GPT-2's are transformers' Conv1D): "
                         f"train it without --fp8")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=convertible)
    return converted


def fp8_module_filter(model: torch.nn.Module, output_head: bool = False) -> Callable[[torch.nn.Module, str], bool]:
    """torchao's module filter for FP8 training: the model's torch.nn.Linear layers, so not GPT-2's Conv1D. The output
    head stays in bf16 (its logits feed the loss) unless `output_head`; layers whose sizes are not multiples of 16,
    which the FP8 matmul needs, always do."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_head and not isinstance(head, torch.nn.Linear):
        raise ValueError(f"--fp8 with the head: {type(model).__name__}'s output head is "
                         f"{type(head).__name__ if head is not None else 'missing'}, not a torch.nn.Linear")
    kept_in_bf16 = None if output_head else head

    def convertible(module: torch.nn.Module, name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and module is not kept_in_bf16
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    return convertible

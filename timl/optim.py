"""The default optimizer and learning-rate schedule, built as the original timl built them."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from timl.arguments import TrainingArguments

NORM_CLASSES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d)


def is_norm_module(module: torch.nn.Module) -> bool:
    # Hugging Face models define their own RMSNorm classes, so the class name is the reliable sign.
    return isinstance(module, NORM_CLASSES) or "norm" in type(module).__name__.lower()


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: everything but biases and norm weights."""
    no_decay = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if name.endswith("bias") or is_norm_module(module):
                no_decay.add(full)
    return {name for name, _ in model.named_parameters()} - no_decay


def create_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    decay = decay_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name in decay], "weight_decay": args.weight_decay},
        {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=args.optim == "adamw_torch_fused",
    )


def warmup_steps(args: TrainingArguments, num_training_steps: int) -> int:
    return args.warmup_steps or math.ceil(num_training_steps * args.warmup_ratio)


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(args, num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )

"""Optimizers and learning-rate schedules: AdamW as the original timl built it, or Muon with an auxiliary AdamW.

Parameter groups follow one rule, here: biases and norm weights never get weight decay; embeddings (input and
output) get it unless --decay_embeddings false. With --optim muon, Muon takes the 2-D weight matrices of the hidden
layers, and AdamW takes everything else: embeddings, the output head, norms and biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from timl.arguments import TrainingArguments

NORM_CLASSES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d)


@dataclass
class OptimizerSet:
    """The optimizers of a run, each with its own schedule, stepped and checkpointed together."""

    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    names: list[str]


def is_norm_module(module: torch.nn.Module) -> bool:
    # Hugging Face models define their own RMSNorm classes, so the class name is the reliable sign.
    return isinstance(module, NORM_CLASSES) or "norm" in type(module).__name__.lower()


def _embedding_parameter_ids(model: torch.nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        ids.add(id(output.weight))
    return ids


def parameter_kinds(model: torch.nn.Module) -> dict[str, str]:
    """Each trainable parameter's kind: 'embedding', 'matrix' (a 2-D hidden weight) or 'vector' (biases, norms)."""
    embeddings = _embedding_parameter_ids(model)
    kinds: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            # A tied weight (GPT-2's output head is its input embedding) is one parameter, under its first name.
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if id(parameter) in embeddings:
                kinds[full] = "embedding"
            elif parameter.ndim == 2 and not name.endswith("bias") and not is_norm_module(module):
                kinds[full] = "matrix"
            else:
                kinds[full] = "vector"
    return kinds


def decay_parameter_names(model: torch.nn.Module, decay_embeddings: bool = True) -> set[str]:
    """Names of the parameters that get weight decay: everything but biases and norm weights (and embeddings, if
    decay_embeddings is off)."""
    decayed = {"matrix", "embedding"} if decay_embeddings else {"matrix"}
    return {name for name, kind in parameter_kinds(model).items() if kind in decayed}


def _adamw(model: torch.nn.Module, names: set[str], args: TrainingArguments) -> torch.optim.AdamW:
    parameters = dict(model.named_parameters())
    decay = decay_parameter_names(model, args.decay_embeddings)
    groups = [
        {"params": [parameters[n] for n in sorted(names & decay)], "weight_decay": args.weight_decay},
        {"params": [parameters[n] for n in sorted(names - decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             fused=args.optim == "adamw_torch_fused" or (args.optim == "muon" and _cuda(model)))


def _cuda(model: torch.nn.Module) -> bool:
    return next(model.parameters()).is_cuda


def create_optimizers(model: torch.nn.Module, args: TrainingArguments) -> list[tuple[str, torch.optim.Optimizer]]:
    """The optimizers --optim asks for, named."""
    kinds = parameter_kinds(model)
    if args.optim != "muon":
        return [("adamw", _adamw(model, set(kinds), args))]
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"--optim muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}.")
    parameters = dict(model.named_parameters())
    matrices = sorted(name for name, kind in kinds.items() if kind == "matrix")
    muon = torch.optim.Muon([parameters[n] for n in matrices], lr=args.muon_learning_rate,
                            momentum=args.muon_momentum, weight_decay=args.weight_decay)
    return [("muon", muon), ("adamw", _adamw(model, set(kinds) - set(matrices), args))]


def check_groups(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Every trainable parameter must be in exactly one group of one optimizer."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    seen: dict[int, int] = {}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    missing = [names[i] for i in names if i not in seen]
    doubled = [names.get(i, "<not a model parameter>") for i, count in seen.items() if count > 1]
    strangers = [i for i in seen if i not in names]
    problems = []
    if missing:
        problems.append(f"in no optimizer group: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if doubled:
        problems.append(f"in more than one group: {', '.join(doubled[:10])}")
    if strangers:
        problems.append(f"{len(strangers)} optimized tensors are not trainable parameters of the model")
    if problems:
        raise ValueError("Bad parameter grouping: " + "; ".join(problems) + ".")


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


def build_optimizer_set(model: torch.nn.Module, args: TrainingArguments, total_steps: int,
                        given: list[tuple[torch.optim.Optimizer | None, object]]) -> OptimizerSet:
    """The user's optimizers (each with its schedule, or --lr_scheduler_type's) or --optim's, checked."""
    if given and given[0][0] is not None:
        optimizers = [optimizer for optimizer, _ in given]
        names = [type(optimizer).__name__.lower() for optimizer in optimizers]
        schedulers = [scheduler or create_scheduler(optimizer, args, total_steps) for optimizer, scheduler in given]
    else:
        named = create_optimizers(model, args)
        names, optimizers = [name for name, _ in named], [optimizer for _, optimizer in named]
        schedulers = [create_scheduler(optimizer, args, total_steps) for optimizer in optimizers]
    check_groups(model, optimizers)
    return OptimizerSet(optimizers, schedulers, names)

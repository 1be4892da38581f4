"""Optimizers and learning-rate schedules: AdamW as the original timl built it, or Muon with an auxiliary AdamW.

Parameter groups follow one rule, here. Weight decay goes where the Hugging Face Trainer puts it, by the rule of its
`get_decay_parameter_names`: every weight, whatever its number of dimensions (the 3-D stacked experts of a mixture
of experts too), but not biases and norms, as that function names them. Embeddings (input and output) are decayed
unless --decay_embeddings false. With --optim muon, Muon takes the decayed 2-D weight matrices of the hidden layers,
and AdamW takes everything else: embeddings, the output head, weights of other shapes, norms and biases.

torch's Muon scales each update by a rule of the weight's shape, read as torch.nn.Linear's [out, in]. GPT-2's Conv1D
stores its weights [in, out], so they go into Muon groups whose lr carries the correction (LR_SCALE): as Newton-Schulz
orthogonalises a matrix and its transpose alike, their update is then the one of the same weight stored [out, in].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import get_scheduler
from transformers.pytorch_utils import Conv1D
from transformers.trainer_pt_utils import get_parameter_names

from timl.config.arguments import OptimizerArguments
from timl.model.head import output_layer

# A Muon group's lr over --muon_learning_rate, kept in the group (and so in checkpoints) for the logged rate.
LR_SCALE = "lr_scale"
FUSED_ADAMW_OPTIMS = ("adamw_torch_fused", "muon")


@dataclass
class OptimizerSet:
    """The optimizers of a run, each with its own schedule, stepped and checkpointed together."""

    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    names: list[str]

    def learning_rates(self) -> dict[str, float]:
        """The rates of the coming step, named as a log line shows them. `lr` is AdamW's where there is an AdamW
        (--learning_rate's), else the first optimizer's; with several optimizers, each one's is `lr_<name>` too,
        Muon's as --muon_learning_rate gives it, before any group's correction."""
        rates = {f"lr_{name}": scheduler.get_last_lr()[0] / optimizer.param_groups[0].get(LR_SCALE, 1.0)
                 for name, optimizer, scheduler in zip(self.names, self.optimizers, self.schedulers)}
        main = rates.get("lr_adamw", next(iter(rates.values())))
        return {"lr": main, **(rates if len(rates) > 1 else {})}

    def step(self, skip: torch.Tensor) -> None:
        """Steps every optimizer and schedule, and clears the gradients. Where `skip` (a bool on the device) is set,
        no weight and no optimizer state changes; the schedules still advance, as the step is spent.

        torch's fused optimizers (fused AdamW) take the flag on the device, as GradScaler hands them its overflow
        flag, so skipping costs no wait for the GPU. Any other optimizer (Muon, a custom one) needs the flag on
        the host first: one synchronisation per step, on those runs alone."""
        skip_on_host: bool | None = None
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
            if getattr(inner, "_step_supports_amp_scaling", False):
                inner.found_inf = skip.float()
                try:
                    optimizer.step()
                finally:
                    del inner.found_inf
            else:
                skip_on_host = bool(skip.item()) if skip_on_host is None else skip_on_host
                if not skip_on_host:
                    optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)


# Hugging Face Trainer.get_decay_parameter_names's rule: no decay for torch.nn.LayerNorm's parameters or for names
# matching these. Stated here because importing transformers.Trainer adds 2.5 s to every run's start;
# tests/train/test_optim.py checks the rule against the Trainer's own method on every architecture.
NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _hf_decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """The names Hugging Face's Trainer decays, through transformers' own walk of the modules. It works on any
    torch.nn.Module, custom models too."""
    return set(get_parameter_names(model, [torch.nn.LayerNorm], list(NO_DECAY_NAME_PATTERNS)))


def _embedding_parameter_ids(model: torch.nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = output_layer(model)
    if head is not None:
        ids.add(id(head[0]))
    return ids


def parameter_kinds(model: torch.nn.Module) -> dict[str, str]:
    """Each trainable parameter's kind: 'bias_or_norm' (never decayed), 'embedding' (the input and output ones),
    'matrix' (a 2-D hidden weight, Muon's) or 'weight' (any other decayed weight: 3-D experts, for one)."""
    decayed, embeddings = _hf_decay_parameter_names(model), _embedding_parameter_ids(model)
    kinds: dict[str, str] = {}
    # A tied weight (GPT-2's output head is its input embedding) is one parameter, under its first name, which is
    # the name the Hugging Face Trainer looks up too.
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name not in decayed:
            kinds[name] = "bias_or_norm"
        elif id(parameter) in embeddings:
            kinds[name] = "embedding"
        else:
            kinds[name] = "matrix" if parameter.ndim == 2 else "weight"
    return kinds


def decay_parameter_names(model: torch.nn.Module, decay_embeddings: bool = True) -> set[str]:
    """Names of the parameters that get weight decay: everything but biases and norm weights (and embeddings, if
    decay_embeddings is off)."""
    decayed = {"matrix", "weight", "embedding"} if decay_embeddings else {"matrix", "weight"}
    return {name for name, kind in parameter_kinds(model).items() if kind in decayed}


def transposed_weight_names(model: torch.nn.Module) -> set[str]:
    """Names of the weights stored [in, out] rather than torch.nn.Linear's [out, in]: those of GPT-2's Conv1D."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {names[id(m.weight)] for m in model.modules() if isinstance(m, Conv1D) and id(m.weight) in names}


def muon_lr_correction(stored_shape: torch.Size | tuple[int, ...]) -> float:
    """For a weight stored [in, out]: torch Muon's lr adjustment for the [out, in] matrix it is, over the one torch
    applies to the stored shape. Computed by the helper torch.optim.Muon itself calls, so it follows torch's rule."""
    from torch.optim._muon import _adjust_lr

    shape = torch.Size(stored_shape)
    return _adjust_lr(1.0, None, torch.Size((shape[1], shape[0]))) / _adjust_lr(1.0, None, shape)


def fused_adamw(optim: str, device: torch.device | str) -> bool:
    """Whether AdamW runs fused: under adamw_torch_fused and muon, on CUDA. Never on the CPU, where tests and smoke
    runs keep AdamW's reference implementation; adamw_torch never."""
    return optim in FUSED_ADAMW_OPTIMS and torch.device(device).type == "cuda"


def _adamw(model: torch.nn.Module, names: set[str], args: OptimizerArguments,
           device: torch.device | str) -> torch.optim.AdamW:
    parameters = dict(model.named_parameters())
    decay = decay_parameter_names(model, args.decay_embeddings)
    groups = [
        {"params": [parameters[n] for n in sorted(names & decay)], "weight_decay": args.weight_decay},
        {"params": [parameters[n] for n in sorted(names - decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             fused=fused_adamw(args.optim, device))


def _muon(model: torch.nn.Module, names: list[str], args: OptimizerArguments) -> torch.optim.Optimizer:
    """Muon over the named matrices, one group per lr correction: the uncorrected one first, as the logged rate
    is read off it, then one for each shape of weight stored [in, out] whose correction is not 1."""
    parameters = dict(model.named_parameters())
    transposed = transposed_weight_names(model)
    by_scale: dict[float, list[torch.nn.Parameter]] = {}
    for name in names:
        scale = muon_lr_correction(parameters[name].shape) if name in transposed else 1.0
        by_scale.setdefault(scale, []).append(parameters[name])
    ordered = sorted(by_scale.items(), key=lambda item: (item[0] != 1.0, item[0]))
    # torch decays by the group's lr × weight_decay: dividing by the scale keeps that at the intended
    # --muon_learning_rate × --muon_weight_decay (times the schedule) in every group.
    groups = [{"params": params, "lr": args.muon_learning_rate * scale, LR_SCALE: scale,
               "weight_decay": args.muon_weight_decay / scale} for scale, params in ordered]
    return torch.optim.Muon(groups, lr=args.muon_learning_rate, momentum=args.muon_momentum,
                            weight_decay=args.muon_weight_decay)


def create_optimizers(model: torch.nn.Module, args: OptimizerArguments,
                      device: torch.device | str | None = None) -> list[tuple[str, torch.optim.Optimizer]]:
    """The optimizers --optim asks for, named. `device` is where the model will train (AdamW is fused on CUDA);
    by default, where its parameters are now."""
    device = next(model.parameters()).device if device is None else device
    kinds = parameter_kinds(model)
    if args.optim != "muon":
        return [("adamw", _adamw(model, set(kinds), args, device))]
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"--optim muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}.")
    matrices = sorted(name for name, kind in kinds.items() if kind == "matrix")
    return [("muon", _muon(model, matrices, args)), ("adamw", _adamw(model, set(kinds) - set(matrices), args, device))]


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


def warmup_steps(args: OptimizerArguments, num_training_steps: int) -> int:
    return args.warmup_steps or math.ceil(num_training_steps * args.warmup_ratio)


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: OptimizerArguments, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(args, num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )


def build_optimizer_set(model: torch.nn.Module, args: OptimizerArguments, total_steps: int,
                        given: list[tuple[torch.optim.Optimizer | None, object]],
                        device: torch.device | str | None = None) -> OptimizerSet:
    """The user's optimizers (each with its schedule, or --lr_scheduler_type's) or --optim's, checked. `device` is
    where the model will train (the Trainer's accelerator.device); by default, where its parameters are now."""
    if given and given[0][0] is not None:
        optimizers = [optimizer for optimizer, _ in given]
        names = [type(optimizer).__name__.lower() for optimizer in optimizers]
        schedulers = [scheduler or create_scheduler(optimizer, args, total_steps) for optimizer, scheduler in given]
    else:
        named = create_optimizers(model, args, device)
        names, optimizers = [name for name, _ in named], [optimizer for _, optimizer in named]
        schedulers = [create_scheduler(optimizer, args, total_steps) for optimizer in optimizers]
    check_groups(model, optimizers)
    return OptimizerSet(optimizers, schedulers, names)

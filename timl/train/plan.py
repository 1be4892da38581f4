"""The performance plan: every speed setting decided once, when the Trainer is built, from the hardware, the model
and what benchmarks/RESULTS.md measured, and printed once, each choice with its reason.

Each choice has a flag, whose "auto" leaves it to the plan; a value given overrides the plan, and an override that
is slower or unsafe is said once, with the measurement behind it. The loss path is the loss selector's
(timl/loss/select.py), the optimizer's fusion is timl/optim.py's: the plan reports both beside its own choices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
import torch

from timl.config.arguments import ComputeArguments
from timl.model.forward import takes_document_block_mask

logger = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64
"""What "auto" pads the vocab to on a GPU: GPT-2's 50257 rows become 50304, 1.06× faster in a compiled loop on one
H100 (../shared/bench/README.md), and the head's matmuls stay on tensor-core shapes."""


@dataclass(frozen=True)
class PerformancePlan:
    """What each training step runs: precision, compilation, vocab padding, activation memory, FP8."""

    bf16: bool
    compile: str  # "blocks" (each transformer block on its own), "model" (the whole module and loss) or "off"
    pad_vocab_to: int | None
    activation_memory: str  # "none", "selective", "full", or a budget between 0 and 1 as text
    fp8: str | None  # a torchao recipe: tensorwise or rowwise
    fp8_head: bool
    lines: tuple[str, ...] = field(default=())  # each choice and its reason, as printed

    @property
    def activation_memory_budget(self) -> float | None:
        """The compiler's activation memory budget, when the setting is one."""
        if self.activation_memory in ("none", "selective", "full"):
            return None
        return float(self.activation_memory)

    def describe(self, *more: str) -> str:
        """The plan as printed: one line per choice, then `more` (what other components chose)."""
        return "Performance plan:\n" + "\n".join(f"  - {line}" for line in (*self.lines, *more))


def make_plan(compute: ComputeArguments, device: torch.device, model: torch.nn.Module,
              loss_path: str = "full", document_masking: bool = False) -> PerformancePlan:
    """The plan for training `model` on `device` as `compute` (the compute group of the arguments) asks, with the
    loss on `loss_path` (the loss selector's choice) and attention kept inside documents when `document_masking`.
    Raises a ValueError when a choice given cannot run here."""
    gpu = device.type == "cuda"
    lines: list[str] = []
    slower: list[str] = []

    bf16 = compute.bf16 and gpu
    if gpu:
        lines.append("precision: bf16 autocast, fp32 weights and optimizer state" if bf16 else
                     "precision: fp32 (--bf16 false)")
        if not bf16:
            slower.append("--bf16 false on a GPU: fp32 matmuls run several times slower than bf16 on tensor cores")
    else:
        lines.append("precision: fp32 (the CPU)")

    compile_mode = _compile_mode(compute.torch_compile, gpu, model, loss_path, lines, slower)

    if compute.pad_vocab_size_to == "auto":
        pad = VOCAB_MULTIPLE if gpu else None
        lines.append(f"vocab padding: to a multiple of {pad}, for tensor-core shapes in the head" if pad else
                     "vocab padding: none (no gain on the CPU)")
    elif compute.pad_vocab_size_to == "none":
        pad = None
        lines.append("vocab padding: none (--pad_vocab_size_to none)")
        if gpu:
            slower.append(f"--pad_vocab_size_to none on a GPU: an odd vocab (GPT-2's 50257) keeps the head off "
                          f"tensor-core shapes; padding to {VOCAB_MULTIPLE} was 1.06x faster")
    else:
        pad = int(compute.pad_vocab_size_to)
        lines.append(f"vocab padding: to a multiple of {pad} (--pad_vocab_size_to)")

    memory = compute.activation_memory
    if memory not in ("none", "full") and compile_mode == "off":
        raise ValueError(f"--activation_memory {memory} is the compiler's, and compilation is off here: add "
                         f"--torch_compile model (or blocks), or use --activation_memory full")
    lines.append({"none": "activation memory: every activation kept for the backward (fastest where it fits)",
                  "selective": "activation memory: the compiler recomputes cheap pointwise activations (Llama-1B: "
                               "8.6 GiB lower at 0.99x on one H100)",
                  "full": "activation memory: each transformer block recomputed in the backward (far less memory, "
                          "about a third more compute)"}.get(
        memory, f"activation memory: the compiler keeps at most {memory} of its saved activations"))

    fp8 = compute.fp8.removesuffix("_head") if compute.fp8 else None
    if fp8:  # (timl.model.kernels.apply_fp8 refuses hardware without FP8 tensor cores)
        lines.append(f"fp8: {fp8} scaling of the decoder's linear layers"
                     + (" and the output head" if compute.fp8_head else ", the head in bf16"))
        if compute.fp8_head and gpu:
            slower.append(f"--fp8 {compute.fp8}: the FP8 head trains on the model's own logits, compiled whole: "
                          f"Llama-1B ran at 0.89x --fp8 {fp8}, its first step 88 s against 15 (one H100)")

    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention is not None:
        reason = (" (on an H100, PyTorch picks cuDNN's kernel: 1.44x its flash kernel)" if attention == "sdpa" and gpu
                  else " with timl's document block mask: blocks between documents are skipped" if document_masking
                  and takes_document_block_mask(model) else "")
        lines.append(f"attention: {attention}{reason}")
        if gpu and attention == "eager":
            slower.append("eager attention on a GPU materialises the attention matrix: sdpa is faster and exact")
        if gpu and document_masking and not takes_document_block_mask(model):
            slower.append(f"--document_masking with {attention} attention: on sdpa's packed-sequence mask Llama-1B "
                          f"ran at 0.87x plain causal attention at 2048 tokens and 0.66x at 8192, where FlexAttention "
                          f"with timl's document block mask ran at 1.01x and 1.18x (one H100); build the model with "
                          f"attn_implementation='flex_attention' where it has it (timl train does)")
    for line in slower:
        logger.warning("Slower than the plan: %s.", line)
    return PerformancePlan(bf16=bf16, compile=compile_mode, pad_vocab_to=pad, activation_memory=memory, fp8=fp8,
                           fp8_head=compute.fp8_head, lines=tuple(lines))


def _compile_mode(asked: str, gpu: bool, model: torch.nn.Module, loss_path: str, lines: list[str],
                  slower: list[str]) -> str:
    """blocks, model or off, as --torch_compile asks. auto: off on the CPU; on a GPU, blocks when the loss goes
    through the head (whose chunked maths compile on their own), else the whole model, so that the logits and their
    loss are in the graph (per block, they would run eager: Llama-1B's FP8 head at 0.74x torchtitan, 67 GiB)."""
    if asked == "false" or asked == "auto" and not gpu:
        lines.append("compile: off" + (" (--torch_compile false)" if asked == "false" else
                                       " (on the CPU, compiling costs more than a short run saves)"))
        if gpu:
            slower.append("--torch_compile false on a GPU: GPT-2 124M ran at 0.40x the compiled speed on one H100")
        return "off"
    if asked == "auto" and loss_path == "logits":
        lines.append("compile: the whole model and loss in one graph (the loss is on the model's own logits, "
                     "which per-block compilation would leave eager)")
        return "model"
    if asked in ("auto", "blocks"):
        if not block_classes(model):
            lines.append(f"compile: the whole model and loss ({type(model).__name__} names no transformer block "
                         f"class to compile on its own)")
            return "model"
        lines.append("compile: each transformer block on its own (one graph that every block reuses), and the "
                     "chunked head's maths (Llama-1B on one H100: 1.15x the whole model compiled, its first step "
                     "9 s against 39)")
        return "blocks"
    lines.append("compile: the whole model and loss in one graph (--torch_compile)")
    if gpu:
        slower.append("--torch_compile model: Llama-1B ran at 0.87x the speed of each block compiled on its own, "
                      "its first step 39 s against 9 (one H100)")
    return "model"


def block_classes(model: torch.nn.Module) -> set[str]:
    """The names of the model's transformer block classes (transformers' _no_split_modules)."""
    return set(getattr(model, "_no_split_modules", None) or [])


def compile_training(training: torch.nn.Module, model: torch.nn.Module, plan: PerformancePlan) -> torch.nn.Module:
    """What the training step and evaluation call: the prepared module compiled whole (autocast, model and loss in
    one graph), or each transformer block of `model` compiled in place (one graph that every block reuses; the
    chunked head compiles its own maths), or the module as it is."""
    if plan.compile == "off":
        return training
    import torch._functorch.config as functorch_config

    # Both are read by AOTAutograd's partitioner when the first step compiles; one training run per process.
    if plan.activation_memory_budget is not None:
        functorch_config.activation_memory_budget = plan.activation_memory_budget
    if plan.activation_memory == "selective":
        if not hasattr(functorch_config, "ban_recompute_materialized_backward"):
            raise ValueError(f"--activation_memory selective: torch {torch.__version__} has no "
                             f"torch._functorch.config.ban_recompute_materialized_backward")
        functorch_config.ban_recompute_materialized_backward = False
    if plan.compile == "model":
        return torch.compile(training)
    names = block_classes(model)
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    for block in blocks:
        block.compile()
    logger.info("Compiled %d %s blocks one by one.", len(blocks), "/".join(sorted(names)))
    return training


MEMORY_HEADROOM = 0.9
"""The share of the GPU's memory a chosen micro-batch may fill by the estimate: the rest absorbs fragmentation and
what the estimate misses."""


def choose_micro_batch(share: int, device: torch.device, measure: Callable[[int], int], parameter_count: int, *,
                       total_memory: int | None, optimizer_bytes_per_parameter: int = 8) -> tuple[int, str]:
    """--per_device_train_batch_size auto: the largest micro-batch that divides this process's `share` of the global
    batch (so that accumulation stays whole) and fits in the GPU's memory, with the reason. `measure(b)` returns the
    peak bytes of one forward and backward of b sequences; two of them (b = 1 and 2) give the memory a sequence
    takes and what every step holds besides, to which the optimizer's state (AdamW: two fp32 values a parameter) is
    added; `total_memory` is the GPU's. On the CPU, whose memory is not measured, the whole share."""
    divisors = [size for size in range(share, 0, -1) if share % size == 0]
    if device.type != "cuda":
        return share, f"micro-batch: {share}, the whole per-process share (auto; the CPU's memory is not measured)"
    one, two = measure(1), measure(min(2, share))
    per_sequence = max(two - one, 1) if share > 1 else one
    fixed = one - per_sequence + parameter_count * optimizer_bytes_per_parameter
    budget = MEMORY_HEADROOM * total_memory
    fitting = [size for size in divisors if fixed + size * per_sequence <= budget]
    if not fitting:
        raise ValueError(f"--per_device_train_batch_size auto: not even one sequence fits ({_gib(fixed + per_sequence)}"
                         f" needed, {_gib(budget)} usable): try --activation_memory full or a shorter --block_size")
    size = fitting[0]
    return size, (f"micro-batch: {size} of this process's {share} sequences a step (auto: {_gib(per_sequence)} a "
                  f"sequence, {_gib(fixed)} for weights, gradients and optimizer state, {_gib(budget)} usable; "
                  f"measured in two eager steps, which hold more than compiled ones)")


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"

"""Training arguments: a dataclass parsed by transformers' HfArgumentParser, from the command line, YAML or JSON.

Names follow `transformers.TrainingArguments` where the meaning is the same, and keep every argument of the original
timl. Every problem is reported at once, before any model is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
from argparse import ArgumentTypeError
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml
from accelerate.utils import LoggerType
from transformers import HfArgumentParser
from transformers.trainer_utils import SchedulerType

from timl.checkpoint.run_folder import another_run_problems
from timl.data.sources import is_mixture, source_problems

SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "muon")
SECRET_FIELDS = ("hub_token",)
# Schedulers whose step takes a metric (ReduceLROnPlateau, GreedyLR). timl steps every schedule once per optimizer step
# and with no metric, so it refuses them (tests/train/test_trainer.py checks this list against transformers').
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
JSON_FIELDS = ("lr_scheduler_kwargs", "forward_kwargs", "liger_kernel_kwargs", "cut_cross_entropy_kwargs")


def _arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainingArguments:
    """Everything a pre-training run needs, besides the model and the data."""

    output_dir: str = _arg("runs/timl", "Where checkpoints (step{N}/, main/) and metrics.jsonl go. One run per "
                                        "folder: a fresh run into a folder that holds another run's checkpoints or "
                                        "metrics is refused (see --resume_from_checkpoint, --overwrite_output_dir).")
    overwrite_output_dir: bool = _arg(False, "Start a fresh run in an --output_dir that holds another run: its "
                                             "checkpoints, main/ and metrics are deleted first.")

    train_file_pattern: str | None = _arg(None, "Glob of training token shards, e.g. 'data/gpt2_c4/train_*.bin', or "
                                                "a weighted mixture of named ones: 'web=data/web/*.bin:0.7,"
                                                "code=data/code/*.bin:0.3'.")
    eval_file_pattern: str | None = _arg(None, "Glob of evaluation token shards (logged as eval_loss), or named eval "
                                               "sets 'val=a/*.bin,code=b/*.bin' (eval_val_loss, eval_code_loss). "
                                               "Without it, no evaluation runs.")
    tokenizer_name: str | None = _arg(None, "The tokenizer saved with every checkpoint and main/ (a folder or Hub id). "
                                            "Default: the one `timl tokenize` wrote beside the training shards.")
    max_train_tokens: int | None = _arg(None, "Train on this many tokens (rounded down to whole steps), repeating "
                                              "the data if needed. Default: --num_train_epochs passes.")
    max_train_steps: int | None = _arg(None, "Train for this many optimizer steps. Excludes --max_train_tokens.")
    num_train_epochs: float = _arg(1.0, "Passes over the training data (may be fractional), when neither "
                                        "--max_train_steps nor --max_train_tokens is given.")
    shuffle: bool = _arg(False, "Read each epoch of the training data in a different order: a permutation of "
                                "sequences, seeded by --seed, the same on every run and world size.")
    max_eval_tokens: int | None = _arg(None, "Evaluate on the first this many tokens. Default: the whole eval set.")
    max_eval_steps: int | None = _arg(None, "Evaluate on the first this many batches. Excludes --max_eval_tokens.")

    block_size: int = _arg(1024, "Tokens per sequence.")
    train_batch_size: int = _arg(512, "Global batch, in sequences, per optimizer step, over all processes.")
    per_device_train_batch_size: int = _arg(32, "Sequences per process per forward pass; the rest is accumulated.")
    per_device_eval_batch_size: int = _arg(64, "Sequences per process per evaluation forward pass.")

    learning_rate: float = _arg(6e-4, "Peak learning rate.")
    weight_decay: float = _arg(0.1, "AdamW weight decay; never applied to biases and norm weights. Muon's is "
                                    "--muon_weight_decay.")
    adam_beta1: float = _arg(0.9, "AdamW beta1.")
    adam_beta2: float = _arg(0.95, "AdamW beta2.")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon.")
    skip_nonfinite_steps: int = _arg(0, "Skip up to this many steps whose loss or gradient norm is not finite "
                                        "(NaN or inf), each logged, and train on; the next one stops the run. 0 "
                                        "stops at the first. A skipped step never changes the weights.")
    max_grad_norm: float = _arg(1.0, "Clip the global gradient norm to this; 0 turns clipping off (the norm is still "
                                     "logged).")
    optim: str = _arg("adamw_torch_fused", f"Optimizer: one of {', '.join(SUPPORTED_OPTIMIZERS)}. muon: Muon for the "
                                           "hidden 2-D weights, AdamW (--learning_rate) for the rest.")
    muon_learning_rate: float = _arg(0.02, "Muon's peak learning rate (0.02, as in Keller Jordan's Muon and "
                                           "modded-nanogpt).")
    muon_momentum: float = _arg(0.95, "Muon's Nesterov momentum (0.95, as in Keller Jordan's Muon).")
    muon_weight_decay: float = _arg(0.0, "Muon's decoupled weight decay: each step scales its weights by 1 - lr × "
                                         "this. 0, as modded-nanogpt's GPT-2 runs with Muon. --weight_decay is "
                                         "AdamW's alone: at Muon's lr, 0.1 would decay 33× faster than AdamW's.")
    decay_embeddings: bool = _arg(True, "Apply weight decay to the input and output embeddings.")
    z_loss_coefficient: float = _arg(0.0, "Add this × mean(logsumexp(logits)²) to the loss (PaLM's z-loss, 1e-4 "
                                          "there); logged as train_z_loss. 0 turns it off.")

    lr_scheduler_type: str = _arg("cosine", "A transformers scheduler: " + ", ".join(
        s.value for s in SchedulerType if s.value not in METRIC_SCHEDULERS)
        + f" (not {' or '.join(METRIC_SCHEDULERS)}, which step on a metric).")
    lr_scheduler_kwargs: dict[str, Any] | str | None = _arg(
        None, 'JSON of extra scheduler arguments, e.g. \'{"min_lr": 1e-5}\' for cosine_with_min_lr.'
    )
    warmup_ratio: float = _arg(0.0, "Warm up over this fraction of the steps. Excludes --warmup_steps.")
    warmup_steps: int = _arg(0, "Warm up over this many steps. Excludes --warmup_ratio.")

    log_every_steps: int = _arg(10, "Log train metrics every this many steps.")
    save_every_steps: int = _arg(1000, "Save a checkpoint every this many steps; 0 saves only at the end.")
    save_total_limit: int | None = _arg(None, "Keep only the newest this many step{N} checkpoints locally (never one "
                                              "still uploading; main is always kept). Default: keep all.")
    eval_every_steps: int = _arg(100, "Evaluate every this many steps (and at step 0); 0 evaluates only at the end.")
    early_stopping_patience: int | None = _arg(None, "Stop once eval_loss has not improved for this many evaluations "
                                                     "in a row, saving a checkpoint and main/ (timl.train.callbacks."
                                                     "EarlyStopping). Default: never.")

    seed: int = _arg(0, "Seed for the weights and the data order; training seeds Python, NumPy and torch with seed + "
                        "rank, so that each process draws its own dropout masks.")
    full_determinism: bool = _arg(False, "Deterministic algorithms everywhere (slower); see transformers' docs.")
    bf16: bool = _arg(True, "bf16 autocast on GPUs. Ignored on the CPU, which trains in fp32.")
    torch_compile: bool = _arg(False, "Compile the model's forward together with the loss.")
    torch_compile_mode: str | None = _arg(None, "torch.compile's mode: default, reduce-overhead, max-autotune or "
                                                "max-autotune-no-cudagraphs.")
    regional_compilation: bool = _arg(False, "With --torch_compile: compile each transformer block on its own "
                                             "(one graph, reused by every block) instead of the whole model: a much "
                                             "faster first step; the rest runs eager.")
    activation_memory_budget: float | None = _arg(None, "With --torch_compile: the share (0 to 1) of its saved "
                                                      "activations the compiler may keep; below 1 it recomputes the "
                                                      "cheapest ones in the backward (torch._functorch.config."
                                                      "activation_memory_budget). Default: the compiler's own choice.")
    compile_recompute_pointwise: bool = _arg(False, "With --torch_compile: let the compiler recompute cheap "
                                                    "pointwise activations in the backward even where it must "
                                                    "write them to memory there (torch._functorch.config."
                                                    "ban_recompute_materialized_backward off). On one H100: Llama-1B "
                                                    "at 8 x 2048 tokens peaks 8.6 GiB lower at 0.99x the speed, "
                                                    "GPT-2 3.6 GiB lower at 0.98x (benchmarks/RESULTS.md).")
    activation_checkpointing: bool = _arg(False, "Recompute each transformer block's activations in the backward "
                                                 "instead of keeping them: far less memory, about a third more "
                                                 "compute. Works with DDP and FSDP.")
    fp8: str | None = _arg(None, "FP8 training of the decoder's linear layers through torchao: tensorwise or "
                                 "rowwise scaling (needs a GPU of compute capability 8.9 or more, e.g. H100).")
    fp8_output_head: bool = _arg(False, "With --fp8: the output head in FP8 too. Its logits then come from the "
                                        "model's own forward (the logits loss path, which auto picks).")
    pad_vocab_size_to: int | None = _arg(None, "Pad the vocab to a multiple of this (64 is fast on GPUs); padded "
                                               "rows never get probability mass, and the config states the padding.")

    report_to: str = _arg("wandb", "Comma-separated Accelerate trackers (" + ", ".join(t.value for t in LoggerType) + ") or 'none'. Without a W&B login, W&B runs offline.")
    wandb_project: str | None = _arg("timl", "W&B project.")
    wandb_run_name: str | None = _arg(None, "W&B run name. Default: W&B's own.")

    push_to_hub: bool = _arg(False, "Upload each checkpoint to the Hub as a revision (step1000, ...) and main.")
    hub_model_id: str | None = _arg(None, "Hub repo to upload to, e.g. 'user/gpt2_c4'. Needed with --push_to_hub.")
    hub_token: str | None = _arg(None, "Hub token. Default: the environment's or the cached login. Never written out.")
    hub_private: bool | None = _arg(None, "Create the Hub repo private.")
    hub_target: str = _arg("hub", "Where --push_to_hub uploads go: 'hub', or a local or mounted folder, written as "
                                  "FOLDER/<revision>/ (for clusters without Hub access).")
    preemption_upload_seconds: float = _arg(20.0, "On SIGTERM or SIGINT, how long pending uploads may take after "
                                                  "the checkpoint is saved. Launchers send SIGKILL 30 s after SIGTERM "
                                                  "(torchrun, accelerate launch, SLURM's default KillWait), so the "
                                                  "step, the save and this must fit in 30 s; an upload that does not "
                                                  "finish stays on disk.")

    forward_kwargs: dict[str, Any] | str | None = _arg(None, "JSON of extra keyword arguments for model.forward.")
    loss_implementation: str = _arg("auto", "How the training loss is computed: auto (the fastest exact path: "
                                            "chunked on a GPU, full on the CPU), "
                                            "logits (the model's own forward), full (the model's head on its hidden "
                                            "states, in one piece), chunked (the same, a chunk of tokens at a time: "
                                            "no full logits), liger or cut_cross_entropy (fused kernels, CUDA). "
                                            "Every path gives the model's own loss: a head it cannot reproduce "
                                            "falls back to logits, said once.")
    use_liger_kernel: bool = _arg(False, "Use Liger's kernels where they fit the model, and its fused loss "
                                         "(--loss_implementation liger).")
    liger_kernel_kwargs: dict[str, Any] | str | None = _arg(None, "JSON of arguments for Liger's patching.")
    use_cut_cross_entropy: bool = _arg(False, "Use Cut Cross-Entropy's fused linear cross-entropy loss "
                                              "(--loss_implementation cut_cross_entropy).")
    cut_cross_entropy_kwargs: dict[str, Any] | str | None = _arg(None, "JSON of arguments for Cut Cross-Entropy.")

    resume_from_checkpoint: str | None = _arg(None, "A checkpoint folder, or 'latest', to continue from.")
    debug: bool = _arg(False, "One train step and one eval batch, evaluating, logging and saving every step, "
                              "reporting to no tracker and uploading nothing.")

    def __post_init__(self) -> None:
        problems = self._parse_json_fields()
        if self.debug:
            # As in the original timl: a smoke run of the whole loop, which touches nothing remote.
            self.max_train_steps, self.max_train_tokens = 1, None
            self.max_eval_steps, self.max_eval_tokens = 1, None
            self.log_every_steps = self.save_every_steps = self.eval_every_steps = 1
            self.push_to_hub, self.report_to = False, "none"
        problems += self._check_values() + self._check_files()
        if problems:
            raise ValueError("Invalid training arguments:\n" + "\n".join(f"  - {p}" for p in problems))

    def _parse_json_fields(self) -> list[str]:
        problems = []
        for name in JSON_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as error:
                    problems.append(f"--{name} is not valid JSON ({error}): {value!r}")
                    continue
            if value is not None and not isinstance(value, dict):
                problems.append(f"--{name} must be a JSON object, got {value!r}")
                continue
            setattr(self, name, value or {})
        return problems

    def _check_values(self) -> list[str]:
        problems = []
        for name in ("block_size", "train_batch_size", "per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("max_train_tokens", "max_train_steps", "max_eval_tokens", "max_eval_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("log_every_steps", "save_every_steps", "eval_every_steps", "warmup_steps",
                     "skip_nonfinite_steps"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be 0 or more, got {getattr(self, name)}")
        for first, second in (("max_train_steps", "max_train_tokens"), ("max_eval_steps", "max_eval_tokens")):
            if getattr(self, first) is not None and getattr(self, second) is not None:
                problems.append(f"--{first} and --{second} contradict each other: give one of them")
        if self.warmup_steps and self.warmup_ratio:
            problems.append("--warmup_steps and --warmup_ratio contradict each other: give one of them")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        per_step = self.per_device_train_batch_size * self.world_size
        if self.train_batch_size >= 1 and per_step >= 1 and self.train_batch_size % per_step:
            problems.append(
                f"--train_batch_size {self.train_batch_size} is not a multiple of --per_device_train_batch_size "
                f"{self.per_device_train_batch_size} × {self.world_size} processes = {per_step}, so gradient "
                f"accumulation steps would not be whole"
            )
        if self.lr_scheduler_type not in {s.value for s in SchedulerType}:
            problems.append(f"--lr_scheduler_type {self.lr_scheduler_type!r} is not a transformers scheduler")
        elif self.lr_scheduler_type in METRIC_SCHEDULERS:
            problems.append(f"--lr_scheduler_type {self.lr_scheduler_type} steps on a metric, but timl steps the "
                            f"schedule after every optimizer step, with none: choose a schedule of the step count, "
                            f"such as cosine or warmup_stable_decay")
        if self.optim not in SUPPORTED_OPTIMIZERS:
            problems.append(f"--optim {self.optim!r} is not supported; use one of {', '.join(SUPPORTED_OPTIMIZERS)}")
        unknown = set(self.trackers) - {t.value for t in LoggerType}
        if unknown:
            problems.append(f"--report_to names unknown trackers: {', '.join(sorted(unknown))}")
        from timl.loss.cross_entropy import LOSS_PATHS

        if self.fp8 not in (None, "tensorwise", "rowwise"):
            problems.append(f"--fp8 {self.fp8!r} is not a recipe: use tensorwise or rowwise")
        if self.activation_memory_budget is not None:
            if not self.torch_compile:
                problems.append("--activation_memory_budget needs --torch_compile")
            if not 0.0 <= self.activation_memory_budget <= 1.0:
                problems.append(f"--activation_memory_budget {self.activation_memory_budget} is not between 0 and 1")
        if self.compile_recompute_pointwise and not self.torch_compile:
            problems.append("--compile_recompute_pointwise needs --torch_compile")
        if self.regional_compilation and not self.torch_compile:
            problems.append("--regional_compilation needs --torch_compile")
        modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.torch_compile_mode not in modes:
            problems.append(f"--torch_compile_mode {self.torch_compile_mode!r} is not one of {', '.join(modes[1:])}")

        if self.loss_implementation not in ("auto", *LOSS_PATHS):
            problems.append(f"--loss_implementation {self.loss_implementation!r} is not one of auto, "
                            f"{', '.join(LOSS_PATHS)}")
        flags = [name for name, on in (("liger", self.use_liger_kernel),
                                       ("cut_cross_entropy", self.use_cut_cross_entropy)) if on]
        if len(flags) > 1 or flags and self.loss_implementation not in ("auto", flags[0]):
            problems.append(f"--use_liger_kernel, --use_cut_cross_entropy and --loss_implementation "
                            f"{self.loss_implementation} ask for different loss paths: pick one")
        if self.fp8_output_head and not self.fp8:
            problems.append("--fp8_output_head needs --fp8")
        if self.fp8_output_head and self.requested_loss_path not in ("auto", "logits"):
            problems.append(f"--fp8_output_head trains on the model's own logits: the {self.requested_loss_path} "
                            f"loss path multiplies the head's weight itself, so its head would stay in bf16")
        if self.z_loss_coefficient and self.requested_loss_path == "cut_cross_entropy":
            problems.append("--z_loss_coefficient does not work with --use_cut_cross_entropy, which has no z-loss")
        if self.z_loss_coefficient < 0:
            problems.append(f"--z_loss_coefficient must be 0 or more, got {self.z_loss_coefficient}")
        if self.muon_weight_decay < 0:
            problems.append(f"--muon_weight_decay must be 0 or more, got {self.muon_weight_decay}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            problems.append(f"--early_stopping_patience must be positive, got {self.early_stopping_patience}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append(f"--save_total_limit must be positive, got {self.save_total_limit}")
        if self.push_to_hub and self.hub_target == "hub" and not self.hub_model_id:
            problems.append("--push_to_hub needs --hub_model_id (or a local --hub_target)")
        return problems

    def _check_files(self) -> list[str]:
        """The file patterns' syntax (timl/data/sources.py), weights and files; and a length for a mixture."""
        problems = source_problems("--train_file_pattern", self.train_file_pattern, weighted=True)
        problems += source_problems("--eval_file_pattern", self.eval_file_pattern, weighted=False)
        if is_mixture(self.train_file_pattern) and not (self.max_train_steps or self.max_train_tokens):
            problems.append("--train_file_pattern names several sources, which have no common epoch: give "
                            "--max_train_steps or --max_train_tokens")
        if not self.num_train_epochs > 0:
            problems.append(f"--num_train_epochs must be positive, got {self.num_train_epochs}")
        if not self.resume_from_checkpoint and not self.overwrite_output_dir:
            problems += another_run_problems(self.output_dir)
        return problems

    @property
    def world_size(self) -> int:
        """The number of processes, as the launcher (torchrun, accelerate launch) announces it."""
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.train_batch_size // (self.per_device_train_batch_size * self.world_size)

    @property
    def requested_loss_path(self) -> str:
        """--loss_implementation, with --use_liger_kernel and --use_cut_cross_entropy as its two shorthands."""
        if self.use_liger_kernel:
            return "liger"
        if self.use_cut_cross_entropy:
            return "cut_cross_entropy"
        return self.loss_implementation

    @property
    def tokens_per_step(self) -> int:
        return self.train_batch_size * self.block_size

    @property
    def trackers(self) -> list[str]:
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        return [] if names in ([], ["none"]) else names

    def to_sanitized_dict(self) -> dict[str, Any]:
        """The arguments with secrets removed, fit for logs, trackers and checkpoints."""
        values = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            if values.get(name):
                values[name] = "<redacted>"
        return values



# timl/data/sources.py also reads these as a list of {name, pattern, weight} mappings, which only a file can hold.
SOURCE_LIST_FIELDS = ("train_file_pattern", "eval_file_pattern")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a float needs a dot: 1e-5 is a string, even inside a mapping such as
    lr_scheduler_kwargs, whose values no field type converts. This loader reads them as YAML 1.2 and JSON do."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+.0123456789"))


def parse_args(*dataclass_types: type, argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parses the command line into the given dataclasses; a single .yaml, .yml or .json argument is read as a file,
    whose values are converted to each field's type as the command line's are (`file_arguments`)."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        return parser.parse_dict(file_arguments(argv[0], parser))
    return parser.parse_args_into_dataclasses(args=argv)


def file_arguments(path: str, parser: HfArgumentParser) -> dict[str, Any]:
    """A YAML or JSON arguments file's values, each converted by the command line's own converter for its field.

    The dataclasses take values as they come, and YAML and JSON type them by their own rules: YAML 1.1 reads 1e-3
    (no dot) as a string, which would reach the optimizer as one. Every value that does not convert, and every
    unknown name, is reported in one error that names the file, before any model is built.
    """
    with open(path, encoding="utf-8") as file:
        values = json.load(file) if path.endswith(".json") else yaml.load(file, Loader=_YamlLoader)
    values = {} if values is None else values  # an empty YAML file: every default
    if not isinstance(values, dict):
        raise ValueError(f"{path} must map argument names to values, not hold a {type(values).__name__}")
    hints = {}
    for dtype in parser.dataclass_types:
        # Not each field's .type: HfArgumentParser narrows those in place (dict | str | None to str).
        dtype_hints = get_type_hints(dtype)
        hints.update({f.name: dtype_hints[f.name] for f in dataclasses.fields(dtype) if f.init})
    # argparse keeps its actions in _actions; each holds the converter and choices HfArgumentParser gave its field.
    actions = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
    unknown = [name for name in values if name not in hints]
    problems = [f"unknown arguments: {', '.join(unknown)}"] if unknown else []
    converted = {}
    for name, value in values.items():
        if name in unknown:
            continue
        try:
            converted[name] = _file_value(name, value, hints[name], actions[name])
        except (ValueError, TypeError, ArgumentTypeError):
            problems.append(f"{name}: expected {_expected(hints[name], actions[name])}, got {value!r}")
    if problems:
        raise ValueError(f"Invalid arguments in {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return converted


def _file_value(name: str, value: Any, hint: Any, action: Any) -> Any:
    """One value of an arguments file, as the command line would give it. Null, and the mappings and lists that
    only a file can hold, are kept where the field takes them."""
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    if isinstance(value, dict) and any((get_origin(option) or option) is dict for option in options):
        return value
    if isinstance(value, list) and name in SOURCE_LIST_FIELDS:
        return value
    if isinstance(value, list) and action.nargs == "+":  # a list field, whose items the command line takes apart
        return [_converted(name, item, action) for item in value]
    return _converted(name, value, action)


def _converted(name: str, value: Any, action: Any) -> Any:
    """A single value through the field's command-line converter, as its text, then checked against its choices."""
    if value is None or isinstance(value, (dict, list)):
        raise TypeError(f"{name} takes no {type(value).__name__}")
    # A YAML or JSON true is the command line's text "true" (str gives "True").
    converted = action.type(str(value).lower() if isinstance(value, bool) else str(value))
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{converted!r} is not a choice of {name}")
    return converted


def _expected(hint: Any, action: Any) -> str:
    """What a field takes, in words for an error: its choices, or its type as declared."""
    if action.choices:
        return f"one of {', '.join(map(str, action.choices))}"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")

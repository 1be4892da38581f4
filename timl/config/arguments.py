"""The arguments of a run, one small dataclass per concern, each read by the component that owns the concern.

The command line stays flat (`--learning_rate`, `--output_dir`), as `transformers.TrainingArguments`' does, and names
follow it where the meaning is the same. `TrainingArguments` holds the groups: `args.optimizer.learning_rate` is
what the optimizer reads; `TrainingArguments(learning_rate=...)` and `args.learning_rate` work too, for scripts and
callbacks written against a flat argument object.

Parsing imports no torch and reads no file: each group checks its own values, `TrainingArguments` checks how they
combine, and every problem is reported at once. What needs the disk (the data's shards, another run in output_dir)
is checked when the Trainer starts, before anything expensive (timl.train.trainer.check_files).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from timl.loss import LOSS_PATHS

SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "muon")
SECRET_FIELDS = ("hub_token",)
# transformers' schedulers (tests/config/test_arguments.py checks this list against its SchedulerType), less the two
# that step on a metric (ReduceLROnPlateau, GreedyLR): timl steps the schedule once per optimizer step, with none.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
# Accelerate's trackers (LoggerType; checked against it by the same test).
TRACKERS = ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")
ATTENTION_CHOICES = ("sdpa", "flash_attention_2", "flex_attention", "eager")
AUTO_MICRO_BATCH = 0
"""--per_device_train_batch_size auto, as its field holds it: the Trainer measures the largest that fits."""
COMPILE_CHOICES = ("auto", "blocks", "model", "true", "false")
ACTIVATION_MEMORY_CHOICES = ("none", "selective", "full")
FP8_RECIPES = ("tensorwise", "rowwise", "tensorwise_head", "rowwise_head")
# Flags that were folded into others: each is refused with its replacement, on the command line, in an arguments
# file and in TrainingArguments(...).
REMOVED_FLAGS = {
    "regional_compilation": "--torch_compile blocks (per block is the default on a GPU)",
    "torch_compile_mode": "nothing: the default mode is the fastest measured (max-autotune: +0.6% for a 10x longer "
                          "first step, benchmarks/RESULTS.md)",
    "compile_recompute_pointwise": "--activation_memory selective",
    "activation_memory_budget": "--activation_memory BUDGET (a number between 0 and 1)",
    "activation_checkpointing": "--activation_memory full",
    "fp8_output_head": "--fp8 tensorwise_head or rowwise_head",
    "use_liger_kernel": "--loss_implementation liger",
    "use_cut_cross_entropy": "--loss_implementation cut_cross_entropy",
}


def _arg(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


def _positive(group: Any, *names: str, optional: bool = False) -> list[str]:
    return [f"--{name} must be positive, got {getattr(group, name)}" for name in names
            if not (optional and getattr(group, name) is None) and getattr(group, name) < 1]


def _not_negative(group: Any, *names: str) -> list[str]:
    return [f"--{name} must be 0 or more, got {getattr(group, name)}" for name in names if getattr(group, name) < 0]


def _one_of(group: Any, first: str, second: str) -> list[str]:
    if getattr(group, first) and getattr(group, second):
        return [f"--{first} and --{second} contradict each other: give one of them"]
    return []


def _json_objects(group: Any, *names: str) -> list[str]:
    """Turns the JSON text of these fields into dicts (None into {}), and says which are not JSON objects."""
    problems = []
    for name in names:
        value = getattr(group, name)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                problems.append(f"--{name} is not valid JSON ({error}): {value!r}")
                continue
        if value is not None and not isinstance(value, dict):
            problems.append(f"--{name} must be a JSON object, got {value!r}")
            continue
        setattr(group, name, value or {})
    return problems


@dataclass
class ModelArguments:
    """Which model to pre-train."""

    model_name: str = _arg("gpt2", "The config to build a fresh model from: gpt2, gpt2-medium, gpt2-large, gpt2-xl or "
                                   "llama-3.2-1b (built locally, no network), a transformers model type such as "
                                   "llama, qwen2 or gemma2 (its default config), a local folder, or a Hub id. The "
                                   "weights are always fresh; see --from_pretrained.")
    config_overrides: str | None = _arg(None, "Changes to the config, as in transformers' run_clm: "
                                              "'n_layer=2,n_embd=64'.")
    from_pretrained: str | None = _arg(None, "Start from these weights instead (continued pre-training): a local "
                                             "folder or a Hub id, loaded with from_pretrained. Its config is used, "
                                             "with --config_overrides; --model_name is then ignored.")
    attn_implementation: str | None = _arg(None, f"Attention: {', '.join(ATTENTION_CHOICES)}. Default: what "
                                                 f"transformers picks for the model (sdpa where the model supports "
                                                 f"it).", choices=[None, *ATTENTION_CHOICES])
    trust_remote_code: bool = _arg(False, "Allow models whose code lives in their Hub repo or folder (transformers' "
                                          "flag).")


@dataclass
class DataArguments:
    """The data: token shards, sequences and batches. A loader factory receives this group."""

    train_file_pattern: str | None = _arg(None, "Glob of training token shards, e.g. 'data/gpt2_c4/train_*.bin', or "
                                                "a weighted mixture of named ones: 'web=data/web/*.bin:0.7,"
                                                "code=data/code/*.bin:0.3'.")
    eval_file_pattern: str | None = _arg(None, "Glob of evaluation token shards (logged as eval_loss), or named eval "
                                               "sets 'val=a/*.bin,code=b/*.bin' (eval_val_loss, eval_code_loss). "
                                               "Without it, no evaluation runs.")
    block_size: int = _arg(1024, "Tokens per sequence.")
    train_batch_size: int = _arg(512, "Global batch, in sequences, per optimizer step, over all processes.")
    per_device_train_batch_size: int = _arg(32, "Sequences per process per forward pass; the rest is accumulated. "
                                                "auto (or 0): the largest that fits in the GPU's memory, measured at "
                                                "start-up in two eager steps; on the CPU, the whole per-process "
                                                "share. The global batch stays --train_batch_size.")
    per_device_eval_batch_size: int = _arg(64, "Sequences per process per evaluation forward pass.")
    max_eval_tokens: int | None = _arg(None, "Evaluate on the first this many tokens. Default: the whole eval set.")
    max_eval_task_items: int | None = _arg(None, "Score the first this many items of each --eval_tasks file. "
                                                 "Default: all.")
    eval_tasks: str | None = _arg(None, "Multiple-choice tasks scored at every evaluation, as local JSON-lines files "
                                        "of {\"context\", \"choices\", \"label\"} items: 'tasks/python_facts.jsonl,"
                                        "hellaswag=data/hellaswag_val.jsonl' (the name is the file's stem unless "
                                        "given), logged as eval_<name>_acc and eval_<name>_acc_norm "
                                        "(lm-evaluation-harness's acc and acc_norm).")
    tokenizer_name: str | None = _arg(None, "The tokenizer saved with every checkpoint and main/ (a folder or Hub id). "
                                            "Default: the one `timl tokenize` wrote beside the training shards.")
    shuffle: bool = _arg(False, "Read each epoch of the training data in a different order: a permutation of "
                                "sequences, seeded by --seed, the same on every run and world size.")
    document_masking: bool = _arg(False, "Keep attention and positions inside each document of a packed "
                                         "sequence: the end-of-text token that `timl tokenize` puts before every "
                                         "document opens it, and the position ids restart there (transformers' "
                                         "packed-sequence masks; absolute positions restart too; on a GPU, timl "
                                         "train picks FlexAttention with timl's block mask where the model has "
                                         "it). The loss is then each document's own. The token is the tokenizer's EOS (the one beside the "
                                         "shards, or --tokenizer_name); a model that cannot is refused at start-up.")

    def problems(self) -> list[str]:
        if self.per_device_train_batch_size == "auto":
            self.per_device_train_batch_size = AUTO_MICRO_BATCH
        problems = _positive(self, "block_size", "train_batch_size", "per_device_eval_batch_size")
        problems += _positive(self, "max_eval_tokens", "max_eval_task_items", optional=True)
        if self.per_device_train_batch_size != AUTO_MICRO_BATCH:
            problems += _positive(self, "per_device_train_batch_size")
        elif self.train_batch_size % self.world_size:
            problems.append(f"--train_batch_size {self.train_batch_size} does not split over {self.world_size} "
                            f"processes")
        per_step = self.per_device_train_batch_size * self.world_size
        if self.train_batch_size >= 1 and per_step >= 1 and self.train_batch_size % per_step:
            problems.append(f"--train_batch_size {self.train_batch_size} is not a multiple of "
                            f"--per_device_train_batch_size {self.per_device_train_batch_size} × {self.world_size} "
                            f"processes = {per_step}, so gradient accumulation steps would not be whole")
        return problems

    @property
    def world_size(self) -> int:
        """The number of processes, as the launcher (torchrun, accelerate launch) announces it."""
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.train_batch_size // (self.per_device_train_batch_size * self.world_size)

    @property
    def tokens_per_step(self) -> int:
        return self.train_batch_size * self.block_size


@dataclass
class LoopArguments:
    """How long the run trains, when it logs and evaluates, and how it reacts to a bad step."""

    max_train_tokens: int | None = _arg(None, "Train on this many tokens (rounded down to whole steps), repeating "
                                              "the data if needed. Default: --num_train_epochs passes.")
    max_train_steps: int | None = _arg(None, "Train for this many optimizer steps. Excludes --max_train_tokens.")
    num_train_epochs: float = _arg(1.0, "Passes over the training data (may be fractional), when neither "
                                        "--max_train_steps nor --max_train_tokens is given.")
    log_every_steps: int = _arg(10, "Log train metrics every this many steps.")
    eval_every_steps: int = _arg(100, "Evaluate every this many steps (and at step 0); 0 evaluates only at the end.")
    max_eval_steps: int | None = _arg(None, "Evaluate on the first this many batches. Excludes --max_eval_tokens.")
    early_stopping_patience: int | None = _arg(None, "Stop once eval_loss has not improved for this many evaluations "
                                                     "in a row, saving a checkpoint and main/ (timl.train.callbacks."
                                                     "EarlyStopping). Default: never.")
    skip_nonfinite_steps: int = _arg(0, "Skip up to this many steps whose loss or gradient norm is not finite "
                                        "(NaN or inf), each logged, and train on; the next one stops the run. 0 "
                                        "stops at the first. A skipped step never changes the weights.")
    seed: int = _arg(0, "Seed for the weights and the data order; training seeds Python, NumPy and torch with seed + "
                        "rank, so that each process draws its own dropout masks.")
    full_determinism: bool = _arg(False, "Deterministic algorithms everywhere (slower); see transformers' docs.")
    debug: bool = _arg(False, "One train step and one eval batch, evaluating, logging and saving every step, "
                              "reporting to no tracker and uploading nothing.")

    def problems(self) -> list[str]:
        problems = _positive(self, "max_train_tokens", "max_train_steps", "max_eval_steps",
                             "early_stopping_patience", optional=True)
        problems += _not_negative(self, "log_every_steps", "eval_every_steps", "skip_nonfinite_steps")
        problems += _one_of(self, "max_train_steps", "max_train_tokens")
        if not self.num_train_epochs > 0:
            problems.append(f"--num_train_epochs must be positive, got {self.num_train_epochs}")
        return problems


@dataclass
class OptimizerArguments:
    """The optimizer, gradient clipping and the learning-rate schedule."""

    optim: str = _arg("adamw_torch_fused", f"Optimizer: one of {', '.join(SUPPORTED_OPTIMIZERS)}. muon: Muon for the "
                                           "hidden 2-D weights, AdamW (--learning_rate) for the rest.")
    learning_rate: float = _arg(6e-4, "Peak learning rate.")
    weight_decay: float = _arg(0.1, "AdamW weight decay; never applied to biases and norm weights. Muon's is "
                                    "--muon_weight_decay.")
    adam_beta1: float = _arg(0.9, "AdamW beta1.")
    adam_beta2: float = _arg(0.95, "AdamW beta2.")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _arg(1.0, "Clip the global gradient norm to this; 0 turns clipping off (the norm is still "
                                     "logged).")
    muon_learning_rate: float = _arg(0.02, "Muon's peak learning rate (0.02, as in Keller Jordan's Muon and "
                                           "modded-nanogpt).")
    muon_momentum: float = _arg(0.95, "Muon's Nesterov momentum (0.95, as in Keller Jordan's Muon).")
    muon_weight_decay: float = _arg(0.0, "Muon's decoupled weight decay: each step scales its weights by 1 - lr × "
                                         "this. 0, as modded-nanogpt's GPT-2 runs with Muon. --weight_decay is "
                                         "AdamW's alone: at Muon's lr, 0.1 would decay 33× faster than AdamW's.")
    decay_embeddings: bool = _arg(True, "Apply weight decay to the input and output embeddings.")
    lr_scheduler_type: str = _arg("cosine", "A transformers scheduler: " + ", ".join(SCHEDULERS)
                                  + f" (not {' or '.join(METRIC_SCHEDULERS)}, which step on a metric).")
    lr_scheduler_kwargs: dict[str, Any] | str | None = _arg(
        None, 'JSON of extra scheduler arguments, e.g. \'{"min_lr": 1e-5}\' for cosine_with_min_lr.')
    warmup_ratio: float = _arg(0.0, "Warm up over this fraction of the steps. Excludes --warmup_steps.")
    warmup_steps: int = _arg(0, "Warm up over this many steps. Excludes --warmup_ratio.")

    def problems(self) -> list[str]:
        problems = _json_objects(self, "lr_scheduler_kwargs") + _not_negative(self, "warmup_steps",
                                                                             "muon_weight_decay")
        problems += _one_of(self, "warmup_steps", "warmup_ratio")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler_type in METRIC_SCHEDULERS:
            problems.append(f"--lr_scheduler_type {self.lr_scheduler_type} steps on a metric, but timl steps the "
                            f"schedule after every optimizer step, with none: choose a schedule of the step count, "
                            f"such as cosine or warmup_stable_decay")
        elif self.lr_scheduler_type not in SCHEDULERS:
            problems.append(f"--lr_scheduler_type {self.lr_scheduler_type!r} is not a transformers scheduler")
        if self.optim not in SUPPORTED_OPTIMIZERS:
            problems.append(f"--optim {self.optim!r} is not supported; use one of {', '.join(SUPPORTED_OPTIMIZERS)}")
        return problems


@dataclass
class LossArguments:
    """How the training loss is computed: the loss path and the z-loss."""

    loss_implementation: str = _arg("auto", "How the training loss is computed: auto (the fastest exact path: "
                                            "chunked on a GPU, full on the CPU), "
                                            "logits (the model's own forward), full (the model's head on its hidden "
                                            "states, in one piece), chunked (the same, a chunk of tokens at a time: "
                                            "no full logits), liger or cut_cross_entropy (fused kernels, CUDA; "
                                            "liger also patches the model's own modules). "
                                            "Every path gives the model's own loss: a head it cannot reproduce "
                                            "falls back to logits, said once.")
    z_loss_coefficient: float = _arg(0.0, "Add this × mean(logsumexp(logits)²) to the loss (PaLM's z-loss, 1e-4 "
                                          "there); logged as train_z_loss. 0 turns it off.")
    liger_kernel_kwargs: dict[str, Any] | str | None = _arg(None, "JSON of arguments for Liger's patching.")
    cut_cross_entropy_kwargs: dict[str, Any] | str | None = _arg(None, "JSON of arguments for Cut Cross-Entropy.")

    def problems(self) -> list[str]:
        problems = _json_objects(self, "liger_kernel_kwargs", "cut_cross_entropy_kwargs")
        if self.loss_implementation not in ("auto", *LOSS_PATHS):
            problems.append(f"--loss_implementation {self.loss_implementation!r} is not one of auto, "
                            f"{', '.join(LOSS_PATHS)}")
        if self.z_loss_coefficient and self.loss_implementation == "cut_cross_entropy":
            problems.append("--z_loss_coefficient does not work with --loss_implementation cut_cross_entropy, which "
                            "has no z-loss")
        return problems + _not_negative(self, "z_loss_coefficient")


@dataclass
class ComputeArguments:
    """How each step computes. "auto" leaves a choice to the performance plan (timl/train/plan.py), which picks from
    the hardware and the model and prints each choice with its reason; a value given here overrides it."""

    bf16: bool = _arg(True, "bf16 autocast on GPUs. Ignored on the CPU, which trains in fp32.")
    torch_compile: str = _arg("auto", "auto (on a GPU: each transformer block compiled on its own, with the "
                                      "chunked head's maths; on the CPU: off), blocks, model (the whole model and "
                                      "loss in one graph: the same speed, a first step several times longer), "
                                      "true (= model) or false.", choices=list(COMPILE_CHOICES))
    activation_memory: str = _arg("none", "What the backward may recompute instead of keeping: none; selective "
                                          "(with compilation: cheap pointwise activations; on one H100, Llama-1B "
                                          "at 8 x 2048 tokens peaks 8.6 GiB lower at 0.99x the speed); full (each "
                                          "transformer block, about a third more compute, works with DDP and "
                                          "FSDP); or a budget between 0 and 1 (with compilation: the share of its "
                                          "saved activations the compiler may keep).")
    fp8: str | None = _arg(None, "FP8 training through torchao (a GPU of compute capability 8.9 or more, e.g. "
                                 "H100): tensorwise or rowwise scaling of the decoder's linear layers, the head in "
                                 "bf16 through the chunked loss (Llama-1B on one H100: 1.11x torchtitan's FP8), or "
                                 "tensorwise_head / rowwise_head to put the output head in FP8 too (its logits then "
                                 "come from the model's own forward, compiled whole: slower to start, no faster).",
                           choices=[None, *FP8_RECIPES])
    pad_vocab_size_to: str = _arg("auto", "Pad the vocab to a multiple of this: auto (64 on a GPU, where it is "
                                          "faster; none on the CPU), none, or a number. Padded rows never get "
                                          "probability mass, and the config states the padding.")
    forward_kwargs: dict[str, Any] | str | None = _arg(None, "JSON of extra keyword arguments for model.forward.")

    def problems(self) -> list[str]:
        problems = _json_objects(self, "forward_kwargs")
        if isinstance(self.torch_compile, bool):  # TrainingArguments(torch_compile=True), as the flag once was
            self.torch_compile = str(self.torch_compile).lower()
        if self.torch_compile not in COMPILE_CHOICES:
            problems.append(f"--torch_compile {self.torch_compile!r} is not one of {', '.join(COMPILE_CHOICES)}")
        if self.fp8 not in (None, *FP8_RECIPES):
            problems.append(f"--fp8 {self.fp8!r} is not a recipe: use one of {', '.join(FP8_RECIPES)}")
        if self.pad_vocab_size_to not in ("auto", "none"):
            try:
                if int(self.pad_vocab_size_to) < 1:
                    raise ValueError
            except ValueError:
                problems.append(f"--pad_vocab_size_to {self.pad_vocab_size_to!r} is not auto, none or a positive "
                                f"number")
        if self.activation_memory not in ACTIVATION_MEMORY_CHOICES:
            try:
                if not 0.0 <= float(self.activation_memory) <= 1.0:
                    raise ValueError
            except ValueError:
                problems.append(f"--activation_memory {self.activation_memory!r} is not none, selective, full or a "
                                f"budget between 0 and 1")
        compiler_only = self.activation_memory not in ("none", "full")
        if compiler_only and self.torch_compile == "false":
            problems.append(f"--activation_memory {self.activation_memory} is the compiler's: it needs compilation "
                            f"(--torch_compile auto, blocks or model)")
        return problems

    @property
    def fp8_head(self) -> bool:
        """Whether the FP8 recipe puts the output head in FP8 too."""
        return self.fp8 is not None and self.fp8.endswith("_head")


@dataclass
class CheckpointArguments:
    """Where the run lives, and when it saves and resumes."""

    output_dir: str = _arg("runs/timl", "Where checkpoints (step{N}/, main/) and metrics.jsonl go. One run per "
                                        "folder: a fresh run into a folder that holds another run's checkpoints or "
                                        "metrics is refused (see --resume_from_checkpoint, --overwrite_output_dir).")
    overwrite_output_dir: bool = _arg(False, "Start a fresh run in an --output_dir that holds another run: its "
                                             "checkpoints, main/ and metrics are deleted first.")
    save_every_steps: int = _arg(1000, "Save a checkpoint every this many steps; 0 saves only at the end.")
    save_total_limit: int | None = _arg(None, "Keep only the newest this many step{N} checkpoints locally (never one "
                                              "still uploading; main is always kept). Default: keep all.")
    resume_from_checkpoint: str | None = _arg(None, "A checkpoint folder to continue from, or 'latest': the newest "
                                                    "complete checkpoint in output_dir, or a fresh start where there "
                                                    "is none yet, so that a requeued job runs the same command.")

    def problems(self) -> list[str]:
        return _not_negative(self, "save_every_steps") + _positive(self, "save_total_limit", optional=True)


@dataclass
class HubArguments:
    """Uploading each checkpoint as a revision, to the Hub or a mounted folder."""

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

    def problems(self) -> list[str]:
        if self.push_to_hub and self.hub_target == "hub" and not self.hub_model_id:
            return ["--push_to_hub needs --hub_model_id (or a local --hub_target)"]
        return []


@dataclass
class LoggingArguments:
    """The trackers that receive the logged values (metrics.jsonl is always written)."""

    report_to: str = _arg("wandb", f"Comma-separated Accelerate trackers ({', '.join(TRACKERS)}) or 'none'. Without "
                                   f"a W&B login, W&B runs offline.")
    wandb_project: str | None = _arg("timl", "W&B project.")
    wandb_run_name: str | None = _arg(None, "W&B run name. Default: W&B's own.")

    def problems(self) -> list[str]:
        unknown = set(self.trackers) - set(TRACKERS)
        return [f"--report_to names unknown trackers: {', '.join(sorted(unknown))}"] if unknown else []

    @property
    def trackers(self) -> list[str]:
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        return [] if names in ([], ["none"]) else names


@dataclass(init=False, eq=False, repr=False)
class TrainingArguments:
    """Everything a pre-training run needs besides the model: the groups below, one per concern.

    Build it from the groups (`TrainingArguments(data=DataArguments(...), ...)`, as the parser does), from flat
    values (`TrainingArguments(output_dir=..., learning_rate=...)`), or both; `dataclasses.replace(args, name=value)`
    works with flat names. Invalid values raise one ValueError that lists every problem.
    """

    GROUPS: ClassVar[dict[str, type]] = {
        "data": DataArguments, "loop": LoopArguments, "optimizer": OptimizerArguments, "loss": LossArguments,
        "compute": ComputeArguments, "checkpoint": CheckpointArguments, "hub": HubArguments,
        "logging": LoggingArguments,
    }
    # The groups are its dataclass fields, so that dataclasses.replace(args, name=value) re-creates it from them
    # and the flat changes.
    data: DataArguments = field(default_factory=DataArguments)
    loop: LoopArguments = field(default_factory=LoopArguments)
    optimizer: OptimizerArguments = field(default_factory=OptimizerArguments)
    loss: LossArguments = field(default_factory=LossArguments)
    compute: ComputeArguments = field(default_factory=ComputeArguments)
    checkpoint: CheckpointArguments = field(default_factory=CheckpointArguments)
    hub: HubArguments = field(default_factory=HubArguments)
    logging: LoggingArguments = field(default_factory=LoggingArguments)

    def __init__(self, **values: Any):
        groups = {name: values.pop(name) for name in list(values) if name in self.GROUPS}
        removed = [f"{name} was removed: use {REMOVED_FLAGS[name]}" for name in values if name in REMOVED_FLAGS]
        unknown = [name for name in values if name not in FIELD_GROUPS and name not in REMOVED_FLAGS]
        if removed or unknown:
            raise TypeError("; ".join(removed + ([f"TrainingArguments got unknown arguments: {', '.join(unknown)}"]
                                                 if unknown else [])))
        for name, group_type in self.GROUPS.items():
            given = groups.get(name)
            changes = {key: value for key, value in values.items() if FIELD_GROUPS[key] == name}
            # A copy: groups are shared by dataclasses.replace, and the checks below normalise some values.
            group = dataclasses.replace(given, **changes) if given is not None else group_type(**changes)
            object.__setattr__(self, name, group)
        problems = self._apply_debug() + [problem for name in self.GROUPS
                                          for problem in getattr(self, name).problems()]
        problems += self._combination_problems()
        if problems:
            raise ValueError("Invalid training arguments:\n" + "\n".join(f"  - {p}" for p in problems))

    def _apply_debug(self) -> list[str]:
        if self.loop.debug:
            # As in the original timl: a smoke run of the whole loop, which touches nothing remote.
            loop = self.loop
            loop.max_train_steps, loop.max_train_tokens, loop.max_eval_steps = 1, None, 1
            self.data.max_eval_tokens = None
            loop.log_every_steps = loop.eval_every_steps = self.checkpoint.save_every_steps = 1
            self.hub.push_to_hub, self.logging.report_to = False, "none"
        return []

    def _combination_problems(self) -> list[str]:
        """What the groups' values contradict across groups."""
        problems = []
        if self.loop.max_eval_steps is not None and self.data.max_eval_tokens is not None:
            problems.append("--max_eval_steps and --max_eval_tokens contradict each other: give one of them")
        if self.compute.fp8_head and self.loss.loss_implementation not in ("auto", "logits"):
            problems.append(f"--fp8 {self.compute.fp8} trains the head in FP8 on the model's own logits: the "
                            f"{self.loss.loss_implementation} loss path multiplies the head's weight itself, so its "
                            f"head would stay in bf16 (--fp8 {self.compute.fp8.removesuffix('_head')} keeps it "
                            f"there on purpose)")
        return problems

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not the groups: a flat field or property of one group.
        group = FIELD_GROUPS.get(name) or PROPERTY_GROUPS.get(name)
        if group is None or name.startswith("__"):
            raise AttributeError(f"TrainingArguments has no argument {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    def __setattr__(self, name: str, value: Any) -> None:
        group = FIELD_GROUPS.get(name)
        where = f": set args.{group}.{name}" if group else ""
        raise AttributeError(f"TrainingArguments is built once and checked{where}, or make new arguments with "
                             f"dataclasses.replace(args, {name}=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainingArguments) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "TrainingArguments(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.GROUPS) + ")"

    def to_dict(self) -> dict[str, Any]:
        """Every argument, flat, as the command line names them."""
        return {key: value for name in self.GROUPS for key, value in dataclasses.asdict(getattr(self, name)).items()}

    def to_sanitized_dict(self) -> dict[str, Any]:
        """The arguments with secrets removed, fit for logs, trackers and checkpoints."""
        values = self.to_dict()
        for name in SECRET_FIELDS:
            if values.get(name):
                values[name] = "<redacted>"
        return values


# Flat argument name -> the group that holds it (each name is in exactly one: HfArgumentParser's flat command line
# needs that too).
FIELD_GROUPS = {f.name: name for name, group in TrainingArguments.GROUPS.items() for f in dataclasses.fields(group)}
PROPERTY_GROUPS = {attribute: name for name, group in TrainingArguments.GROUPS.items()
                   for attribute, value in vars(group).items() if isinstance(value, property)}

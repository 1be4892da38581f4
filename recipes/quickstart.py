"""The README's main job: pre-train a small GPT-2 on the English text bundled with Python, offline, on any machine.

    uv run python recipes/quickstart.py                     # one process (CPU or GPU)
    accelerate launch recipes/quickstart.py                 # as Accelerate is configured
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 recipes/quickstart.py   # DDP on the CPU

It makes GPT-2 BPE shards of Python's documentation (`timl tokenize --dataset_path timl:python-docs`) if they are
missing, then trains for a few minutes on 2 CPU cores. Every flag of recipes/gpt2_c4.py works here too; only the
defaults differ.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

from filelock import FileLock

from timl.config.arguments import TrainingArguments, parse_args
from timl.train.pretrain import ModelArguments, pretrain, recipe_process
from timl.data.tokenize import PYTHON_DOCS_DIR, prepare_python_docs


@dataclass
class QuickstartModelArguments(ModelArguments):
    config_overrides: str | None = field(
        default="n_layer=2,n_embd=64,n_head=2,n_positions=128",
        metadata={"help": "Changes to GPT-2's config: a 2-layer, 64-wide model, with GPT-2's full 50257-token vocab."},
    )


@dataclass
class QuickstartArguments(TrainingArguments):
    output_dir: str = field(default="runs/quickstart", metadata={"help": "Where checkpoints and metrics go."})
    data_dir: str = field(default=PYTHON_DOCS_DIR, metadata={"help": "Where the Python-docs shards are made."})
    block_size: int = field(default=128, metadata={"help": "Tokens per sequence."})
    train_batch_size: int = field(default=8, metadata={"help": "Global batch, in sequences."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per process per pass."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Sequences per process per eval pass."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    warmup_steps: int = field(default=20, metadata={"help": "Warm-up steps."})
    max_train_steps: int | None = field(default=150, metadata={"help": "Optimizer steps."})
    max_eval_tokens: int | None = field(default=2**13, metadata={"help": "Evaluate on this many tokens."})
    log_every_steps: int = field(default=10, metadata={"help": "Log every this many steps."})
    eval_every_steps: int = field(default=50, metadata={"help": "Evaluate every this many steps."})
    save_every_steps: int = field(default=0, metadata={"help": "Save only at the end."})
    report_to: str = field(default="none", metadata={"help": "Trackers; none keeps the quickstart offline."})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch or adamw_torch_fused."})


def with_shards(args: QuickstartArguments) -> QuickstartArguments:
    """Fills in the shard patterns, making the shards first if needed; one process makes them, the rest wait."""
    if args.train_file_pattern and args.eval_file_pattern:
        return args
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(args.data_dir) / ".tokenize.lock")):
        train_pattern, eval_pattern = prepare_python_docs(args.data_dir)
    return replace(args, train_file_pattern=args.train_file_pattern or train_pattern,
                   eval_file_pattern=args.eval_file_pattern or eval_pattern)


if __name__ == "__main__":
    model_args, training_args = parse_args(QuickstartModelArguments, QuickstartArguments)
    training_args = with_shards(training_args)
    with recipe_process():
        latest = pretrain(model_args, training_args)
    print(f"\nQuickstart done: eval loss {latest.get('eval_loss', float('nan')):.3f}. Checkpoints in "
          f"{training_args.output_dir}/ (load main/ with AutoModelForCausalLM.from_pretrained), metrics in "
          f"{training_args.output_dir}/metrics.jsonl, data in {training_args.data_dir}/.")

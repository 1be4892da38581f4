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

from timl.config import ModelArguments, TrainingArguments, parse_args
from timl.train.pretrain import pretrain, recipe_process
from timl.data.tokenize import PYTHON_DOCS_DIR, prepare_python_docs


@dataclass
class QuickstartArguments:
    """Where the quickstart makes its shards."""

    data_dir: str = field(default=PYTHON_DOCS_DIR, metadata={"help": "Where the Python-docs shards are made."})


# A few minutes on 2 CPU cores: a 2-layer, 64-wide GPT-2 with GPT-2's full 50257-token vocab, offline.
DEFAULTS = dict(
    config_overrides="n_layer=2,n_embd=64,n_head=2,n_positions=128",
    output_dir="runs/quickstart",
    block_size=128,
    train_batch_size=8,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=3e-3,
    warmup_steps=20,
    max_train_steps=150,
    max_eval_tokens=2**13,
    log_every_steps=10,
    eval_every_steps=50,
    save_every_steps=0,  # only at the end
    report_to="none",  # the quickstart stays offline
    optim="adamw_torch",  # runs anywhere, the CPU included
)


def with_shards(args: TrainingArguments, data_dir: str) -> TrainingArguments:
    """Fills in the shard patterns, making the shards first if needed; one process makes them, the rest wait."""
    if args.train_file_pattern and args.eval_file_pattern:
        return args
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(data_dir) / ".tokenize.lock")):
        train_pattern, eval_pattern = prepare_python_docs(data_dir)
    return replace(args, train_file_pattern=args.train_file_pattern or train_pattern,
                   eval_file_pattern=args.eval_file_pattern or eval_pattern)


if __name__ == "__main__":
    model_args, quickstart, training_args = parse_args(ModelArguments, QuickstartArguments, TrainingArguments,
                                                       defaults=DEFAULTS)
    training_args = with_shards(training_args, quickstart.data_dir)
    with recipe_process():
        latest = pretrain(model_args, training_args)
    print(f"\nQuickstart done: eval loss {latest.get('eval_loss', float('nan')):.3f}. Checkpoints in "
          f"{training_args.output_dir}/ (load main/ with AutoModelForCausalLM.from_pretrained), metrics in "
          f"{training_args.output_dir}/metrics.jsonl, data in {quickstart.data_dir}/.")

"""What the examples share: defaults for a small CPU run, and the Python-docs shards when no data is given."""

from dataclasses import dataclass, field, replace

from timl.config.arguments import TrainingArguments
from timl.train.pretrain import ModelArguments
from timl.data.tokenize import PYTHON_DOCS_DIR, prepare_python_docs


@dataclass
class SmallModelArguments(ModelArguments):
    config_overrides: str | None = field(default="n_layer=2,n_embd=64,n_head=2,n_positions=128",
                                         metadata={"help": "Changes to GPT-2's config: 2 layers, 64 wide."})


@dataclass
class SmallRunArguments(TrainingArguments):
    block_size: int = field(default=128, metadata={"help": "Tokens per sequence."})
    train_batch_size: int = field(default=8, metadata={"help": "Global batch, in sequences."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per process per pass."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    warmup_steps: int = field(default=10, metadata={"help": "Warm-up steps."})
    max_train_steps: int | None = field(default=50, metadata={"help": "Optimizer steps."})
    max_eval_tokens: int | None = field(default=2**13, metadata={"help": "Evaluate on this many tokens."})
    eval_every_steps: int = field(default=25, metadata={"help": "Evaluate every this many steps."})
    report_to: str = field(default="none", metadata={"help": "Trackers; none keeps the example offline."})
    optim: str = field(default="adamw_torch", metadata={"help": "The optimizer."})


def with_default_data(args: SmallRunArguments) -> SmallRunArguments:
    """Without --train_file_pattern: GPT-2 shards of Python's documentation, made first if missing."""
    if args.train_file_pattern is not None:
        return args
    train_pattern, eval_pattern = prepare_python_docs(PYTHON_DOCS_DIR)
    return replace(args, train_file_pattern=train_pattern, eval_file_pattern=args.eval_file_pattern or eval_pattern)

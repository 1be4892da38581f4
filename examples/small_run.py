"""What the examples share: defaults for a small CPU run, and the Python-docs shards when no data is given."""

from dataclasses import replace

from timl.config import TrainingArguments
from timl.data.tokenize import PYTHON_DOCS_DIR, prepare_python_docs

# A 2-layer, 64-wide GPT-2 for a few dozen steps on the CPU; every flag still overrides these.
SMALL_RUN_DEFAULTS = dict(
    config_overrides="n_layer=2,n_embd=64,n_head=2,n_positions=128",
    block_size=128,
    train_batch_size=8,
    per_device_train_batch_size=8,
    learning_rate=3e-3,
    warmup_steps=10,
    max_train_steps=50,
    max_eval_tokens=2**13,
    eval_every_steps=25,
    report_to="none",  # the examples stay offline
    optim="adamw_torch",  # runs anywhere, the CPU included
)


def with_default_data(args: TrainingArguments) -> TrainingArguments:
    """Without --train_file_pattern: GPT-2 shards of Python's documentation, made first if missing."""
    if args.train_file_pattern is not None:
        return args
    train_pattern, eval_pattern = prepare_python_docs(PYTHON_DOCS_DIR)
    return replace(args, train_file_pattern=train_pattern, eval_file_pattern=args.eval_file_pattern or eval_pattern)

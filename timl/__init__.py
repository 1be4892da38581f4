"""timl: pre-train Hugging Face causal language models from scratch on a few GPUs."""

from __future__ import annotations

import importlib
from typing import Any

from timl.shards import ShardError, ShardInfo, count_values, list_shards, read_header, write_shard

# Whatever needs torch, transformers or Accelerate loads on first use, so that `timl tokenize` starts quickly.
_LAZY = {
    "IGNORE_INDEX": "timl.losses",
    "BatchLoader": "timl.loader",
    "ShardLoader": "timl.loader",
    "Trainer": "timl.trainer",
    "TrainerCallback": "timl.callbacks",
    "TrainerControl": "timl.callbacks",
    "TrainerState": "timl.callbacks",
    "EarlyStopping": "timl.callbacks",
    "TrainingArguments": "timl.arguments",
    "parse_args": "timl.arguments",
    "Metric": "timl.metrics",
    "CrossEntropy": "timl.metrics",
    "Perplexity": "timl.metrics",
    "Accuracy": "timl.metrics",
    "ModelArguments": "timl.recipe",
    "pretrain": "timl.recipe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'timl' has no attribute {name!r}")


__all__ = [
    "ShardError",
    "ShardInfo",
    "count_values",
    "list_shards",
    "read_header",
    "write_shard",
    *_LAZY,
]

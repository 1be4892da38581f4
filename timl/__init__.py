"""timl: pre-train Hugging Face causal language models from scratch on a few GPUs."""

from __future__ import annotations

import importlib
from typing import Any

from timl.data.shards import ShardError, ShardInfo, count_values, list_shards, read_header, write_shard

# Whatever needs torch, transformers or Accelerate loads on first use, so that `timl tokenize` starts quickly.
_LAZY = {
    "IGNORE_INDEX": "timl.loss.cross_entropy",
    "BatchLoader": "timl.data.loader",
    "ShardLoader": "timl.data.loader",
    "Trainer": "timl.train.trainer",
    "TrainerCallback": "timl.train.callbacks",
    "TrainerControl": "timl.train.callbacks",
    "TrainerState": "timl.train.callbacks",
    "EarlyStopping": "timl.train.callbacks",
    "TrainingArguments": "timl.config",
    "parse_args": "timl.config",
    "Metric": "timl.report.metrics",
    "CrossEntropy": "timl.report.metrics",
    "Perplexity": "timl.report.metrics",
    "Accuracy": "timl.report.metrics",
    "ModelArguments": "timl.config",
    "pretrain": "timl.train.pretrain",
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

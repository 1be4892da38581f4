"""timl: pre-train Hugging Face causal language models from scratch on a few GPUs."""

from timl.loader import IGNORE_INDEX, BatchLoader, ShardLoader
from timl.shards import ShardError, ShardInfo, count_values, list_shards, read_header, write_shard

__all__ = [
    "IGNORE_INDEX",
    "BatchLoader",
    "ShardError",
    "ShardInfo",
    "ShardLoader",
    "count_values",
    "list_shards",
    "read_header",
    "write_shard",
]

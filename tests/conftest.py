"""Shared test helpers: tiny shards written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from timl.shards import write_shard


def write_token_shards(directory: Path, lengths: list[int], dtype: str = "uint16", prefix: str = "train", seed: int = 0):
    """Writes shards of random tokens with the given lengths; returns the glob pattern and the whole stream."""
    rng = np.random.default_rng(seed)
    high = 2**16 if dtype == "uint16" else 2**20
    stream = rng.integers(0, high, size=sum(lengths)).astype(dtype)
    start = 0
    for index, length in enumerate(lengths):
        write_shard(directory / f"{prefix}_{index:06d}.bin", stream[start : start + length])
        start += length
    return str(directory / f"{prefix}_*.bin"), stream


@pytest.fixture
def token_shards(tmp_path):
    return lambda lengths, **kwargs: write_token_shards(tmp_path, lengths, **kwargs)

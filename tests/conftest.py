"""Shared test helpers: tiny shards written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from timl.data.shards import write_shard


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


# Dropout off, so that runs differing only in how the batch is split (processes, accumulation) must agree.
TINY_GPT2 = "n_layer=2,n_embd=32,n_head=2,vocab_size=64,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"


def write_learnable_shards(directory: Path, num_tokens: int, prefix: str, seed: int = 0) -> np.ndarray:
    """A stream a tiny model can learn: runs of a fixed cycle through 16 of 64 ids, restarting at random places."""
    cycle = np.random.default_rng(1234).permutation(64)[:16]  # the same "language" for every split
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 16, size=num_tokens // 32 + 1)
    stream = np.concatenate([np.roll(cycle, -start)[np.arange(32) % 16] for start in starts])[:num_tokens]
    write_shard(directory / f"{prefix}_000000.bin", stream.astype(np.uint16))
    return stream


def read_metrics(output_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_tokenizer_folder(folder) -> str:
    """A word-level tokenizer over the tiny models' 64 ids (words w1 ... w63, split at whitespace), whose EOS is id 0,
    saved as transformers saves one; returns the folder."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eot>": 0, **{f"w{index}": index for index in range(1, 64)}}
    words = Tokenizer(WordLevel(vocab, unk_token="w1"))
    words.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eot>").save_pretrained(folder)
    return str(folder)

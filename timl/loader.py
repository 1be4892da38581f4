"""Batches of tokens from shards, and the loader interface the Trainer consumes.

The shards matching a pattern form one token stream, in sorted file order. Global batch k covers stream tokens
[k·G, (k+1)·G) with G = per-device batch × world size × block size; rank r takes the r-th contiguous slice of it.
A batch may span two shards, so a short last shard loses nothing. The loader's state is a single stream position,
which is why resuming costs O(1): the next batch is read straight from that position.
"""

from __future__ import annotations

import bisect
from concurrent.futures import Future, ThreadPoolExecutor
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from timl.shards import ShardError, ShardInfo, list_shards

IGNORE_INDEX = -100


@runtime_checkable
class BatchLoader(Protocol):
    """What the Trainer consumes: an iterable of batches whose position can be saved and restored.

    Each batch is a dict of tensors on the device. A language-model batch holds `input_ids` and `labels`, both
    [batch, block], where labels are already shifted (labels[t] is the token after input_ids[t]) and -100 marks
    positions without a target. Iterating continues from the current position; `load_state_dict` of a
    `state_dict()` taken after k batches makes the next batch the (k+1)-th.
    """

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _distributed_rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Stream:
    """Shards read as one memory-mapped stream of values."""

    def __init__(self, shards: list[ShardInfo]):
        self.shards = shards
        self.starts = np.cumsum([0] + [shard.num_values for shard in shards]).tolist()
        self.num_values = self.starts[-1]

    def locate(self, position: int) -> tuple[ShardInfo, int]:
        """The shard holding stream position `position`, and the position within it."""
        index = bisect.bisect_right(self.starts, position) - 1
        return self.shards[index], position - self.starts[index]

    def read_into(self, out: np.ndarray, start: int) -> int:
        """Copies values [start, start + len(out)) into out, stopping at the stream's end; returns how many."""
        stop = min(start + len(out), self.num_values)
        written, position = 0, start
        while position < stop:
            shard, offset = self.locate(position)
            count = min(shard.num_values - offset, stop - position)
            # A fresh map per read, dropped at once: a long-lived map keeps every page it touched resident, which
            # would grow each rank's memory by the whole shard over an epoch.
            out[written : written + count] = shard.memmap(offset, offset + count)
            written += count
            position += count
        return written


class ShardLoader:
    """Memory-mapped, globally batched, exactly resumable batches of shifted tokens from shard files.

    Args:
        file_pattern: glob of token shards (timl or llm.c format), read in sorted order as one stream.
        block_size: tokens per sequence.
        per_device_batch_size: sequences per rank per batch. Give this or `global_batch_size`.
        global_batch_size: sequences per batch over all ranks; must divide by the world size.
        rank, world_size: this process's slice; by default torch.distributed's, or 0 and 1.
        device: where batches go; copies from pinned memory are non-blocking on CUDA.
        max_tokens: use only the first this many tokens of the stream.
        vocab_size: if given, a token id at or above it is an error naming its file and position.
        float_file_pattern: glob of float32 shards aligned with the token stream; each batch then carries them
            under `float_key`, aligned with input_ids (for example per-token loss weights).
    """

    def __init__(
        self,
        file_pattern: str | Path,
        *,
        block_size: int,
        per_device_batch_size: int | None = None,
        global_batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        device: torch.device | str = "cpu",
        max_tokens: int | None = None,
        vocab_size: int | None = None,
        float_file_pattern: str | Path | None = None,
        float_key: str = "weights",
    ):
        default_rank, default_world_size = _distributed_rank_and_world_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world_size if world_size is None else world_size
        self.per_device_batch_size = self._resolve_per_device_batch_size(per_device_batch_size, global_batch_size)
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}.")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the world of {self.world_size} processes.")
        self.file_pattern = str(file_pattern)
        self.block_size = block_size
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.float_key = float_key

        self.tokens = _Stream(list_shards(self.file_pattern, "tokens"))
        self.tokens_per_rank = self.per_device_batch_size * block_size
        self.tokens_per_batch = self.tokens_per_rank * self.world_size
        self.num_tokens = self._resolve_token_limit(max_tokens)
        self.floats = self._open_floats(float_file_pattern)
        self.position = 0

    def _resolve_per_device_batch_size(self, per_device: int | None, global_: int | None) -> int:
        if (per_device is None) == (global_ is None):
            raise ValueError("Give exactly one of per_device_batch_size and global_batch_size.")
        if global_ is not None:
            if global_ < 1 or global_ % self.world_size:
                raise ValueError(
                    f"global_batch_size {global_} does not divide evenly over the world size {self.world_size}."
                )
            per_device = global_ // self.world_size
        if per_device < 1:
            raise ValueError(f"per_device_batch_size must be positive, got {per_device}.")
        return per_device

    def _resolve_token_limit(self, max_tokens: int | None) -> int:
        available = self.tokens.num_values
        if max_tokens is not None and max_tokens > available:
            warnings.warn(
                f"max_tokens {max_tokens} exceeds the {available} tokens in {self.file_pattern!r}; using them all.",
                stacklevel=3,
            )
        limit = available if max_tokens is None else min(max_tokens, available)
        if limit < self.tokens_per_batch:
            sizes = ", ".join(f"{s.path.name}: {s.num_values}" for s in self.tokens.shards[:5])
            raise ShardError(
                f"{self.file_pattern!r} gives {limit} tokens ({sizes}{', ...' if len(self.tokens.shards) > 5 else ''}), "
                f"fewer than one global batch of {self.tokens_per_batch} = {self.per_device_batch_size} sequences "
                f"× {self.world_size} ranks × {self.block_size} tokens. Lower the batch or block size, or add data."
            )
        return limit

    def _open_floats(self, pattern: str | Path | None) -> _Stream | None:
        if pattern is None:
            return None
        floats = _Stream(list_shards(pattern, "floats"))
        if floats.num_values != self.tokens.num_values:
            raise ShardError(
                f"The float shards {str(pattern)!r} hold {floats.num_values} values, but the token shards "
                f"{self.file_pattern!r} hold {self.tokens.num_values}; they must align value for token."
            )
        return floats

    def __len__(self) -> int:
        """The number of global batches in the data (under the token limit), from the start."""
        return self.num_tokens // self.tokens_per_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # One batch is read ahead on a thread, so the training step never waits for the disk or the copy.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="timl-loader") as reader:
            position = self.position
            ahead = self._submit(reader, position)
            while ahead is not None:
                batch = ahead.result()
                position += self.tokens_per_batch
                ahead = self._submit(reader, position)
                self.position = position
                yield batch

    def _submit(self, reader: ThreadPoolExecutor, position: int) -> Future | None:
        if position + self.tokens_per_batch > self.num_tokens:
            return None
        return reader.submit(self._read_batch, position + self.rank * self.tokens_per_rank)

    def _read_batch(self, start: int) -> dict[str, torch.Tensor]:
        pin = self.device.type == "cuda"
        # One extra token gives the last label; past the end of the data it stays IGNORE_INDEX.
        window = torch.full((self.tokens_per_rank + 1,), IGNORE_INDEX, dtype=torch.int64, pin_memory=pin)
        self.tokens.read_into(window.numpy(), start)
        if self.vocab_size is not None:
            self._check_vocab(window.numpy(), start)
        shape = (self.per_device_batch_size, self.block_size)
        batch = {
            "input_ids": window[:-1].view(shape).to(self.device, non_blocking=pin),
            "labels": window[1:].view(shape).to(self.device, non_blocking=pin),
        }
        if self.floats is not None:
            values = torch.empty(self.tokens_per_rank, dtype=torch.float32, pin_memory=pin)
            self.floats.read_into(values.numpy(), start)
            batch[self.float_key] = values.view(shape).to(self.device, non_blocking=pin)
        return batch

    def _check_vocab(self, window: np.ndarray, start: int) -> None:
        bad = np.flatnonzero(window >= self.vocab_size)
        if len(bad):
            shard, offset = self.tokens.locate(start + int(bad[0]))
            raise ShardError(
                f"{shard.path}: token {int(window[bad[0]])} at position {offset} is not below the vocab size "
                f"{self.vocab_size}. Were these shards made with another tokenizer?"
            )

    def state_dict(self) -> dict[str, Any]:
        shard, offset = self.tokens.locate(min(self.position, self.tokens.num_values - 1))
        return {
            "position": self.position,
            "shard": shard.path.name,
            "shard_offset": offset,
            "num_stream_tokens": self.tokens.num_values,
            "files": [shard.path.name for shard in self.tokens.shards],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues at the saved stream position. The batch geometry may differ from the saved run's: the stream
        then goes on from the same token, so no token is seen twice or skipped."""
        files = [shard.path.name for shard in self.tokens.shards]
        if state["files"] != files or state["num_stream_tokens"] != self.tokens.num_values:
            raise ShardError(
                f"The loader state was saved over other shards: it lists {len(state['files'])} files with "
                f"{state['num_stream_tokens']} tokens, but {self.file_pattern!r} now gives {len(files)} files with "
                f"{self.tokens.num_values} tokens. Resume with the same data."
            )
        self.position = int(state["position"])

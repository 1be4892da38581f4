"""Batches of tokens from shards, and the loader interface the Trainer consumes.

The shards matching a pattern form one token stream, in sorted file order. A loader reads a *global order* made of
that stream's tokens, epoch after epoch: each epoch in stream order or, with `shuffle=True`, as a seeded permutation
of windows of `shuffle_window` tokens, a different one every epoch. Global batch k covers global-order tokens
[k·G, (k+1)·G) with G = per-device batch × world size × block size; rank r takes the r-th contiguous slice of it.
A batch may span two shards or two epochs. A label is always the token that follows in the data itself, so the last
position of a shuffled window is still trained on its true continuation.

The loader's state is a single position in the global order, the same on every rank whatever the world size. That is
why resuming costs O(1): the next batch is read straight from that position, and a shuffled epoch's order is a keyed
bijection evaluated one window at a time, never a table built by replaying anything.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from timl.collectives import rank_and_world_size
from timl.loss.cross_entropy import IGNORE_INDEX
from timl.data.shards import ShardError, ShardInfo, list_shards

PAD_INPUT_ID = 0  # what padded positions of a last, partial batch feed the model; their labels are IGNORE_INDEX


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


_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Folds integers into one well-spread 64-bit key (splitmix64's finaliser after each)."""
    key = 0
    for value in values:
        key = (key ^ value) + 0x9E3779B97F4A7C15 & _MASK64
        key = (key ^ (key >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        key = (key ^ (key >> 27)) * 0x94D049BB133111EB & _MASK64
        key ^= key >> 31
    return key


class KeyedPermutation:
    """A seeded permutation of range(size), evaluated one index at a time in O(1) time and memory.

    A four-round Feistel network permutes the integers below the smallest power of 4 at or above `size` (at most
    4 × size of them); an image at or above `size` is permuted again until it falls below ("cycle walking"), which
    keeps the map a bijection of range(size). Four rounds of a keyed mixing function make it look random.
    """

    ROUNDS = 4

    def __init__(self, size: int, key: int):
        if size < 1:
            raise ValueError(f"a permutation needs at least one element, got {size}")
        self.size = size
        self.half_bits = max(1, ((size - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half_bits) - 1
        self.round_keys = [mix_seed(key, round_index) for round_index in range(self.ROUNDS)]

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(f"{index} is outside range({self.size})")
        value = index
        while True:
            left, right = value >> self.half_bits, value & self.mask
            for round_key in self.round_keys:
                left, right = right, left ^ (mix_seed(right, round_key) & self.mask)
            value = (left << self.half_bits) | right
            if value < self.size:
                return value


class TokenSource:
    """One token stream read in a global order: its first `max_tokens` tokens, epoch after epoch, each epoch in
    stream order or (shuffle=True) as a permutation of windows keyed by the seed and the epoch.

    A shuffled epoch holds the whole windows only: the last `num_tokens % shuffle_window` tokens are left out, so
    that sequences keep starting on window boundaries in every epoch.
    """

    def __init__(
        self,
        file_pattern: str | Path,
        *,
        max_tokens: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_window: int = 1024,
        vocab_size: int | None = None,
        float_file_pattern: str | Path | None = None,
    ):
        self.file_pattern = str(file_pattern)
        self.tokens = _Stream(list_shards(self.file_pattern, "tokens"))
        self.floats = self._open_floats(float_file_pattern)
        self.num_tokens = self._resolve_token_limit(max_tokens)
        self.vocab_size = vocab_size
        self.shuffle, self.seed, self.window = shuffle, seed, shuffle_window
        if shuffle and shuffle_window < 1:
            raise ValueError(f"shuffle_window must be positive, got {shuffle_window}.")
        self.epoch_tokens = self.num_tokens // shuffle_window * shuffle_window if shuffle else self.num_tokens
        if self.epoch_tokens < 1:
            unit = f" one shuffle window of {shuffle_window} tokens" if shuffle else " a token"
            raise ShardError(f"{self.file_pattern!r} gives {self.num_tokens} tokens, less than{unit}.")
        self._permutation: tuple[int, KeyedPermutation] | None = None

    def _resolve_token_limit(self, max_tokens: int | None) -> int:
        available = self.tokens.num_values
        if max_tokens is not None and max_tokens > available:
            warnings.warn(
                f"max_tokens {max_tokens} exceeds the {available} tokens in {self.file_pattern!r}; using them all.",
                stacklevel=4,
            )
        return available if max_tokens is None else min(max_tokens, available)

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

    def locate(self, position: int) -> tuple[int, int]:
        """The data position of global-order position `position`, and how many tokens from it on are contiguous in
        both orders."""
        epoch, offset = divmod(position, self.epoch_tokens)
        if not self.shuffle:
            return offset, self.epoch_tokens - offset
        window, within = divmod(offset, self.window)
        return self._epoch_permutation(epoch)(window) * self.window + within, self.window - within

    def _epoch_permutation(self, epoch: int) -> KeyedPermutation:
        # One read of the attribute: the read-ahead thread and state_dict() may ask for different epochs at once.
        cached = self._permutation
        if cached is None or cached[0] != epoch:
            cached = (epoch, KeyedPermutation(self.epoch_tokens // self.window, mix_seed(self.seed, epoch)))
            self._permutation = cached
        return cached[1]

    def read(self, start: int, inputs: np.ndarray, labels: np.ndarray, floats: np.ndarray | None = None) -> None:
        """Fills inputs with global-order tokens start, start + 1, ...; labels with the token after each in the data
        (IGNORE_INDEX after the data's last); floats, if given, with the float channel aligned with inputs."""
        done = 0
        while done < len(inputs):
            data, contiguous = self.locate(start + done)
            count = min(contiguous, len(inputs) - done)
            window = np.full(count + 1, IGNORE_INDEX, dtype=np.int64)
            self.tokens.read_into(window, data)
            if self.vocab_size is not None:
                self._check_vocab(window, data)
            inputs[done : done + count] = window[:-1]
            labels[done : done + count] = window[1:]
            if floats is not None:
                self.floats.read_into(floats[done : done + count], data)
            done += count

    def _check_vocab(self, window: np.ndarray, data: int) -> None:
        bad = np.flatnonzero(window >= self.vocab_size)
        if len(bad):
            shard, offset = self.tokens.locate(data + int(bad[0]))
            raise ShardError(
                f"{shard.path}: token {int(window[bad[0]])} at position {offset} is not below the vocab size "
                f"{self.vocab_size}. Were these shards made with another tokenizer?"
            )

    def state(self, position: int) -> dict[str, Any]:
        """What a saved position means: the files, and the order they are read in. JSON-serialisable."""
        shard, offset = self.tokens.locate(self.locate(position)[0])
        return {
            "epoch": position / self.epoch_tokens,
            "shard": shard.path.name,  # where the next token comes from; for people reading the checkpoint
            "shard_offset": offset,
            "num_stream_tokens": self.tokens.num_values,
            "files": [shard.path.name for shard in self.tokens.shards],
            "order": self.order(),
        }

    def order(self) -> dict[str, Any]:
        return {"epoch_tokens": self.epoch_tokens, "shuffle": self.shuffle,
                "seed": self.seed if self.shuffle else None, "shuffle_window": self.window if self.shuffle else None}

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuses a state saved over other data or in another order, naming what differs."""
        files = [shard.path.name for shard in self.tokens.shards]
        if state["files"] != files or state["num_stream_tokens"] != self.tokens.num_values:
            raise ShardError(
                f"The loader state was saved over other shards: it lists {len(state['files'])} files with "
                f"{state['num_stream_tokens']} tokens, but {self.file_pattern!r} now gives {len(files)} files with "
                f"{self.tokens.num_values} tokens. Resume with the same data."
            )
        saved = state.get("order")  # states written before epochs existed hold none: stream order, no limit change
        if saved is not None and saved != self.order():
            differing = ", ".join(f"{key} {saved.get(key)} → {value}" for key, value in self.order().items()
                                  if saved.get(key) != value)
            raise ShardError(f"The loader state of {self.file_pattern!r} was saved in another data order ({differing}); "
                             f"resume with the same shuffle, seed and token limit.")


def resolve_batch_geometry(per_device: int | None, global_: int | None, rank: int | None,
                           world_size: int | None) -> tuple[int, int, int]:
    """(rank, world size, per-device batch size), checked; rank and world size default to torch.distributed's."""
    default_rank, default_world_size = rank_and_world_size()
    rank = default_rank if rank is None else rank
    world_size = default_world_size if world_size is None else world_size
    if (per_device is None) == (global_ is None):
        raise ValueError("Give exactly one of per_device_batch_size and global_batch_size.")
    if global_ is not None:
        if global_ < 1 or global_ % world_size:
            raise ValueError(f"global_batch_size {global_} does not divide evenly over the world size {world_size}.")
        per_device = global_ // world_size
    if per_device < 1:
        raise ValueError(f"per_device_batch_size must be positive, got {per_device}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size} processes.")
    return rank, world_size, per_device


class GlobalBatches:
    """What timl's loaders share: global batches sliced over the ranks, a position in the global order, and one
    batch read ahead on a thread. Subclasses fill a rank's slice in `_read_batch` and may end in `_finished`."""

    def __init__(self, *, block_size: int, per_device_batch_size: int | None, global_batch_size: int | None,
                 rank: int | None, world_size: int | None, device: torch.device | str):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}.")
        self.rank, self.world_size, self.per_device_batch_size = resolve_batch_geometry(
            per_device_batch_size, global_batch_size, rank, world_size)
        self.block_size = block_size
        self.device = torch.device(device)
        self.tokens_per_rank = self.per_device_batch_size * block_size
        self.tokens_per_batch = self.tokens_per_rank * self.world_size
        self.position = 0

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
        if self._finished(position):
            return None
        return reader.submit(self._read_batch, position + self.rank * self.tokens_per_rank)

    def _finished(self, position: int) -> bool:
        return False

    def _read_batch(self, start: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _host_buffers(self, *dtypes: torch.dtype) -> list[torch.Tensor]:
        """A rank's flat buffers, pinned for non-blocking copies on CUDA: input ids, labels, then any others."""
        pin = self.device.type == "cuda"
        inputs = torch.full((self.tokens_per_rank,), PAD_INPUT_ID, dtype=torch.int64, pin_memory=pin)
        labels = torch.full((self.tokens_per_rank,), IGNORE_INDEX, dtype=torch.int64, pin_memory=pin)
        return [inputs, labels, *(torch.zeros(self.tokens_per_rank, dtype=dtype, pin_memory=pin) for dtype in dtypes)]

    def _to_device(self, **flat: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = (self.per_device_batch_size, self.block_size)
        pin = self.device.type == "cuda"
        return {key: value.view(shape).to(self.device, non_blocking=pin) for key, value in flat.items()}


class ShardLoader(GlobalBatches):
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
        repeat: go on epoch after epoch without end (for training); by default iteration ends after one pass.
        pad_last: in a single pass, also yield the last, partial global batch, padded with input id 0 and label
            -100, so that every token is seen once and every rank yields the same number of batches (for evaluation).
        shuffle, seed: read each epoch as a permutation of windows of `shuffle_window` tokens (default: one
            sequence), keyed by the seed and the epoch: a different order every epoch, the same on every run.
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
        repeat: bool = False,
        pad_last: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_window: int | None = None,
    ):
        super().__init__(block_size=block_size, per_device_batch_size=per_device_batch_size,
                         global_batch_size=global_batch_size, rank=rank, world_size=world_size, device=device)
        if repeat and pad_last:
            raise ValueError("pad_last applies to a single pass; a repeating loader has no last batch.")
        self.file_pattern = str(file_pattern)
        self.float_key = float_key
        self.repeat, self.pad_last = repeat, pad_last
        self.source = TokenSource(file_pattern, max_tokens=max_tokens, shuffle=shuffle, seed=seed,
                                  shuffle_window=shuffle_window or block_size, vocab_size=vocab_size,
                                  float_file_pattern=float_file_pattern)
        self.tokens = self.source.tokens
        self.num_tokens = self.source.num_tokens
        if not repeat and not pad_last and self.source.epoch_tokens < self.tokens_per_batch:
            shards = self.tokens.shards
            sizes = ", ".join(f"{s.path.name}: {s.num_values}" for s in shards[:5])
            raise ShardError(
                f"{self.file_pattern!r} gives {self.source.epoch_tokens} tokens ({sizes}{', ...' if len(shards) > 5 else ''}), "
                f"fewer than one global batch of {self.tokens_per_batch} = {self.per_device_batch_size} sequences "
                f"× {self.world_size} ranks × {self.block_size} tokens. Lower the batch or block size, or add data."
            )

    def __len__(self) -> int:
        """Global batches in one pass over the data (one epoch, under the token limit), the padded last one included
        with pad_last. A repeating loader goes on past it."""
        batches, rest = divmod(self.source.epoch_tokens, self.tokens_per_batch)
        return batches + int(self.pad_last and rest > 0)

    @property
    def epoch(self) -> float:
        """Passes over the data so far: 1.5 is halfway through the second epoch."""
        return self.position / self.source.epoch_tokens

    def progress(self) -> dict[str, float]:
        """What the training log can show about the data: the epoch."""
        return {"epoch": self.epoch}

    def _finished(self, position: int) -> bool:
        if self.repeat:
            return False
        end = self.source.epoch_tokens if self.pad_last else self.source.epoch_tokens - self.tokens_per_batch + 1
        return position >= end

    def _read_batch(self, start: int) -> dict[str, torch.Tensor]:
        with_floats = self.source.floats is not None
        inputs, labels, *floats = self._host_buffers(*([torch.float32] if with_floats else []))
        # In a single pass, what lies beyond the epoch stays padding.
        count = self.tokens_per_rank if self.repeat else max(0, min(self.tokens_per_rank, self.source.epoch_tokens - start))
        self.source.read(start, inputs.numpy()[:count], labels.numpy()[:count], floats[0].numpy()[:count] if floats else None)
        return self._to_device(input_ids=inputs, labels=labels, **({self.float_key: floats[0]} if floats else {}))

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, **self.source.state(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues at the saved position of the global order. The batch geometry and the world size may differ
        from the saved run's: the stream then goes on from the same token, so no token is seen twice or skipped."""
        self.source.check_state(state)
        self.position = int(state["position"])

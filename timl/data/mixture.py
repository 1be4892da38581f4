"""Several token sources mixed by weight, read as one global order of sequences.

Sequence j of the global order (block_size tokens) comes from the source that a fixed schedule names, and is that
source's next unread sequence: source s's c-th sequence covers tokens [c·B, (c+1)·B) of its own global order (see
`timl.data.loader.TokenSource`), which repeats, shuffled or not, independently of the other sources. The schedule repeats
every `SCHEDULE_CYCLE` sequences and, within a cycle, always draws the source furthest behind its share, so that every
prefix of the order holds each source's share to within one sequence. Both "which source" and "how many sequences of
it came before" are O(1) for any j, so the state is one position, resuming costs O(1), and any world size reads the
same order. Batching and the rank slices are those of `timl.data.loader.ShardLoader`, in sequences.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timl.data.loader import GlobalBatches, TokenSource, mix_seed
from timl.data.shards import ShardError

SCHEDULE_CYCLE = 10_000  # sequences; weights are honoured to 1 part in this many


class Schedule:
    """Which source each sequence of the global order comes from, and how many of a source's came before it."""

    def __init__(self, weights: list[float], cycle: int = SCHEDULE_CYCLE):
        if not weights or any(not weight > 0 for weight in weights):
            raise ValueError(f"mixture weights must be positive, got {weights}")
        self.cycle = cycle
        self.quotas = _apportion(weights, cycle)
        if 0 in self.quotas:
            raise ValueError(f"mixture weights {weights}: a source would get less than 1 sequence in {cycle}")
        order = np.empty(cycle, dtype=np.int64)
        taken = [0] * len(weights)
        for index in range(cycle):
            # The source furthest behind its share after this sequence; ties go to the first source.
            deficits = [(index + 1) * quota - count * cycle for quota, count in zip(self.quotas, taken)]
            chosen = deficits.index(max(deficits))
            order[index] = chosen
            taken[chosen] += 1
        self.order = order
        # before[s, i]: sequences of source s among the cycle's first i.
        self.before = np.zeros((len(weights), cycle + 1), dtype=np.int64)
        for source in range(len(weights)):
            self.before[source, 1:] = np.cumsum(order == source)

    def source(self, sequence: int) -> int:
        return int(self.order[sequence % self.cycle])

    def count(self, source: int, sequences: int) -> int:
        """How many of the global order's first `sequences` sequences come from `source`."""
        cycles, rest = divmod(sequences, self.cycle)
        return cycles * self.quotas[source] + int(self.before[source, rest])


def _apportion(weights: list[float], total: int) -> list[int]:
    """Whole shares of `total` proportional to the weights, summing to it (largest remainders first)."""
    exact = [weight / sum(weights) * total for weight in weights]
    shares = [int(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda index: shares[index] - exact[index])
    for index in by_remainder[: total - sum(shares)]:
        shares[index] += 1
    return shares


class MixtureLoader(GlobalBatches):
    """Batches whose sequences are drawn from several token sources in proportion to their weights.

    Args:
        sources: name -> (glob of token shards, weight). Weights need not sum to 1.
        block_size, per_device_batch_size, global_batch_size, rank, world_size, device, vocab_size: as for
            `timl.data.loader.ShardLoader`.
        shuffle, seed: shuffle each source's epochs (windows of one sequence), keyed by the seed and the source's
            place in `sources`.

    Each source repeats on its own when exhausted; `progress()` gives each one's tokens and epochs so far. The
    loader has no length: a mixture has no single epoch, so the caller says how many batches to take.
    """

    def __init__(
        self,
        sources: Mapping[str, tuple[str | Path, float]],
        *,
        block_size: int,
        per_device_batch_size: int | None = None,
        global_batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ):
        super().__init__(block_size=block_size, per_device_batch_size=per_device_batch_size,
                         global_batch_size=global_batch_size, rank=rank, world_size=world_size, device=device)
        self.names = list(sources)
        self.weights = [float(weight) for _, weight in sources.values()]
        self.schedule = Schedule(self.weights)
        self.sources = [
            TokenSource(pattern, shuffle=shuffle, seed=mix_seed(seed, index + 1), shuffle_window=block_size,
                        vocab_size=vocab_size)
            for index, (pattern, _) in enumerate(sources.values())
        ]

    @property
    def sequences(self) -> int:
        """Sequences of the global order read so far, over all ranks."""
        return self.position // self.block_size

    def source_tokens(self) -> dict[str, int]:
        """Tokens read so far from each source, over all ranks."""
        return {name: self.schedule.count(index, self.sequences) * self.block_size
                for index, name in enumerate(self.names)}

    def progress(self) -> dict[str, float]:
        """What the training log can show about the data: tokens_<name> and epoch_<name> for every source."""
        values: dict[str, float] = {}
        for (name, tokens), source in zip(self.source_tokens().items(), self.sources):
            values[f"tokens_{name}"] = tokens
            values[f"epoch_{name}"] = tokens / source.epoch_tokens
        return values

    def _read_batch(self, start: int) -> dict[str, torch.Tensor]:
        inputs, labels = self._host_buffers()
        inputs_flat, labels_flat = inputs.numpy(), labels.numpy()
        first = start // self.block_size
        for row in range(self.per_device_batch_size):
            sequence = first + row
            index = self.schedule.source(sequence)
            source_start = self.schedule.count(index, sequence) * self.block_size
            span = slice(row * self.block_size, (row + 1) * self.block_size)
            self.sources[index].read(source_start, inputs_flat[span], labels_flat[span])
        return self._to_device(input_ids=inputs, labels=labels)

    def state_dict(self) -> dict[str, Any]:
        sources = {}
        for index, (name, weight, source) in enumerate(zip(self.names, self.weights, self.sources)):
            position = self.schedule.count(index, self.sequences) * self.block_size
            sources[name] = {"weight": weight, "position": position, **source.state(position)}
        return {"position": self.position, "block_size": self.block_size, "sources": sources}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues at the saved position. The sources' names, weights and data must be the saved run's (their
        order decides every sequence); the batch geometry and the world size may differ."""
        saved = state.get("sources")
        if saved is None:
            raise ShardError("The loader state was saved by a single-source loader; resume a mixture with a mixture.")
        current = dict(zip(self.names, self.weights))
        if {name: entry["weight"] for name, entry in saved.items()} != current or list(saved) != self.names:
            described = lambda mix: ", ".join(f"{name}:{weight:g}" for name, weight in mix.items())
            saved_mixture = described({name: entry["weight"] for name, entry in saved.items()})
            # The order sets the schedule and each source's shuffle seed, so it must match too.
            raise ShardError(f"The loader state was saved with the mixture {saved_mixture}, not {described(current)}; "
                             f"resume with the same sources and weights, in the same order.")
        if state.get("block_size", self.block_size) != self.block_size:
            raise ShardError(f"The loader state was saved with block_size {state['block_size']}, "
                             f"not {self.block_size}.")
        for name, source in zip(self.names, self.sources):
            source.check_state(saved[name])
        self.position = int(state["position"])

"""Mixtures: proportions to within a sequence at every prefix, each source repeating on its own, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from timl.data.mixture import MixtureLoader, Schedule
from timl.data.shards import ShardError, write_shard

BLOCK = 4
WEB_TOKENS, CODE_TOKENS = 400, 120
CODE_OFFSET = 10_000  # code's token ids: a sequence's first id says which source it came from, and where


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "code").mkdir()
    web = np.arange(WEB_TOKENS, dtype=np.uint16)
    code = np.arange(CODE_OFFSET, CODE_OFFSET + CODE_TOKENS, dtype=np.uint16)
    write_shard(tmp_path / "web" / "train_000000.bin", web[:250])
    write_shard(tmp_path / "web" / "train_000001.bin", web[250:])
    write_shard(tmp_path / "code" / "train_000000.bin", code)
    return {"web": (str(tmp_path / "web" / "*.bin"), 0.7), "code": (str(tmp_path / "code" / "*.bin"), 0.3)}


def sequences(loader: MixtureLoader, batches: int) -> list[list[int]]:
    rows = []
    for index, batch in enumerate(loader):
        rows += batch["input_ids"].tolist()
        if index + 1 == batches:
            return rows
    raise AssertionError("the loader ended")


def test_every_prefix_holds_the_weights_to_within_one_sequence(sources):
    loader = MixtureLoader(sources, block_size=BLOCK, per_device_batch_size=5)
    rows = sequences(loader, 200)
    from_web = np.cumsum([row[0] < CODE_OFFSET for row in rows])
    prefix = np.arange(1, len(rows) + 1)
    assert np.abs(from_web - 0.7 * prefix).max() <= 1
    assert from_web[-1] == 700
    assert loader.source_tokens() == {"web": 700 * BLOCK, "code": 300 * BLOCK}
    progress = loader.progress()
    assert progress["tokens_web"] == 2800 and progress["epoch_web"] == pytest.approx(2800 / WEB_TOKENS)
    assert progress["epoch_code"] == pytest.approx(1200 / CODE_TOKENS)  # code, the smaller, is on its tenth pass


def test_each_source_repeats_its_own_stream_with_true_labels(sources):
    loader = MixtureLoader(sources, block_size=BLOCK, per_device_batch_size=5)
    batches = [{key: value.clone() for key, value in batch.items()} for _, batch in zip(range(60), loader)]
    inputs = torch.cat([batch["input_ids"] for batch in batches]).numpy()
    labels = torch.cat([batch["labels"] for batch in batches]).numpy()
    for is_code, size, offset in ((False, WEB_TOKENS, 0), (True, CODE_TOKENS, CODE_OFFSET)):
        mine = (inputs[:, 0] >= CODE_OFFSET) == is_code
        read = inputs[mine].flatten() - offset
        np.testing.assert_array_equal(read, np.arange(len(read)) % size)  # in order, wrapping around at the end
        expected_labels = np.where(read == size - 1, -100, read + 1 + offset)  # the data's last token has no label
        np.testing.assert_array_equal(labels[mine].flatten(), expected_labels)


def test_the_schedule_is_exact_per_cycle_and_o1_anywhere():
    schedule = Schedule([3.0, 1.0, 1.0], cycle=10)
    assert schedule.quotas == [6, 2, 2]
    drawn = [schedule.source(index) for index in range(1000)]
    for source in range(3):
        for count in (0, 7, 10, 999, 1000):
            assert schedule.count(source, count) == drawn[:count].count(source)
    with pytest.raises(ValueError, match="less than 1 sequence in 10"):
        Schedule([100.0, 1.0], cycle=10)


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_continues_exactly_even_on_another_world_size(sources, shuffle):
    def make(world_size: int, rank: int = 0) -> MixtureLoader:
        return MixtureLoader(sources, block_size=BLOCK, global_batch_size=6, rank=rank, world_size=world_size,
                             shuffle=shuffle, seed=5)

    uninterrupted = sequences(make(1), 70)  # 420 sequences: several epochs of each source
    first = make(1)
    sequences(first, 31)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["sources"]["code"]["epoch"] > 1  # resuming inside a later epoch of the smaller source
    for world_size in (1, 2):
        ranks = []
        for rank in range(world_size):
            resumed = make(world_size, rank)
            resumed.load_state_dict(state)
            ranks.append(sequences(resumed, 39))
        per_device = 6 // world_size
        continued = [row for step in range(39) for rows in ranks for row in rows[step * per_device : (step + 1) * per_device]]
        assert continued == uninterrupted[31 * 6 :]
    if shuffle:  # the shuffled order really differs from the plain one
        plain = MixtureLoader(sources, block_size=BLOCK, global_batch_size=6, rank=0, world_size=1)
        assert sequences(plain, 70) != uninterrupted


def test_resume_with_other_weights_or_sources_is_refused(sources):
    loader = MixtureLoader(sources, block_size=BLOCK, per_device_batch_size=2)
    sequences(loader, 3)
    state = loader.state_dict()
    changed = {"web": (sources["web"][0], 0.5), "code": (sources["code"][0], 0.5)}
    with pytest.raises(ShardError, match="saved with the mixture web:0.7, code:0.3, not web:0.5, code:0.5"):
        MixtureLoader(changed, block_size=BLOCK, per_device_batch_size=2).load_state_dict(state)
    with pytest.raises(ShardError, match="saved by a single-source loader"):
        loader.load_state_dict({"position": 0, "files": []})


def test_resume_with_the_same_sources_in_another_order_is_refused(sources):
    """The order decides the schedule and each source's shuffle seed, so the same names and weights listed the other
    way round would read other sequences from the same position."""
    loader = MixtureLoader(sources, block_size=BLOCK, per_device_batch_size=2)
    sequences(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))  # through JSON, as a checkpoint keeps it
    reversed_order = {"code": sources["code"], "web": sources["web"]}
    with pytest.raises(ShardError, match="saved with the mixture web:0.7, code:0.3, not code:0.3, web:0.7"):
        MixtureLoader(reversed_order, block_size=BLOCK, per_device_batch_size=2).load_state_dict(state)

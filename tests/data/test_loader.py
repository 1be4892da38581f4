"""The shard loader: global batching, shifted labels, token limits, O(1) resume, side channel, memory, errors."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch

from timl.data.loader import BatchLoader, ShardLoader
from timl.loss.cross_entropy import IGNORE_INDEX
from timl.data.shards import ShardError, ShardInfo, write_shard


def _collect(loader, count=None):
    batches = []
    for batch in loader:
        batches.append({key: value.clone() for key, value in batch.items()})
        if count is not None and len(batches) == count:
            break
    return batches


def test_is_a_batch_loader(token_shards):
    pattern, _ = token_shards([100])
    assert isinstance(ShardLoader(pattern, block_size=4, per_device_batch_size=2), BatchLoader)


def test_labels_are_inputs_shifted_by_one_across_shards(token_shards):
    pattern, stream = token_shards([50, 7, 60])
    loader = ShardLoader(pattern, block_size=5, per_device_batch_size=2)
    batches = _collect(loader)
    assert len(batches) == len(loader) == 117 // 10
    for index, batch in enumerate(batches):
        assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.int64
        expected = stream[index * 10 : index * 10 + 11].astype(np.int64)
        np.testing.assert_array_equal(batch["input_ids"].flatten().numpy(), expected[:-1])
        np.testing.assert_array_equal(batch["labels"].flatten().numpy(), expected[1:])


def test_only_the_label_after_the_last_token_is_ignored(token_shards):
    pattern, stream = token_shards([30, 10])
    batches = _collect(ShardLoader(pattern, block_size=4, per_device_batch_size=1))
    assert len(batches) == 10
    labels = torch.cat([batch["labels"].flatten() for batch in batches]).numpy()
    np.testing.assert_array_equal(labels[:-1], stream[1:].astype(np.int64))
    assert labels[-1] == IGNORE_INDEX


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_cover_each_token_of_a_global_batch_exactly_once(token_shards, world_size):
    pattern, stream = token_shards([300, 500], dtype="uint32")
    per_device, block = 2, 8
    global_tokens = per_device * block * world_size
    per_rank = [_collect(ShardLoader(pattern, block_size=block, per_device_batch_size=per_device, rank=rank,
                                     world_size=world_size)) for rank in range(world_size)]
    num_batches = 800 // global_tokens
    assert all(len(batches) == num_batches for batches in per_rank)
    for step in range(num_batches):
        inputs = torch.cat([per_rank[rank][step]["input_ids"].flatten() for rank in range(world_size)]).numpy()
        np.testing.assert_array_equal(inputs, stream[step * global_tokens : (step + 1) * global_tokens])


def test_global_batch_size_splits_over_ranks(token_shards):
    pattern, _ = token_shards([1000])
    loader = ShardLoader(pattern, block_size=4, global_batch_size=8, rank=1, world_size=4)
    assert loader.per_device_batch_size == 2 and loader.tokens_per_batch == 32


def test_token_limit_counts_from_headers_and_keeps_the_real_next_label(token_shards):
    pattern, stream = token_shards([64, 64])
    loader = ShardLoader(pattern, block_size=4, per_device_batch_size=2, max_tokens=40)
    batches = _collect(loader)
    assert len(batches) == len(loader) == 5
    # Token 40 exists in the data, so the last label is real rather than ignored.
    assert batches[-1]["labels"].flatten()[-1].item() == stream[40]


def test_token_limit_beyond_the_data_warns_and_uses_it_all(token_shards):
    pattern, _ = token_shards([64])
    with pytest.warns(UserWarning, match="exceeds the 64 tokens"):
        loader = ShardLoader(pattern, block_size=4, per_device_batch_size=2, max_tokens=1000)
    assert len(loader) == 8


@pytest.mark.parametrize("stop_after", [1, 2, 4])
def test_resume_continues_identically_across_a_shard_boundary(token_shards, stop_after):
    pattern, _ = token_shards([45, 45, 45])
    make = lambda: ShardLoader(pattern, block_size=4, per_device_batch_size=3, rank=1, world_size=2)
    uninterrupted = _collect(make())
    first = make()
    _collect(first, count=stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # the state survives a trip through a file
    resumed = make()
    resumed.load_state_dict(state)
    continued = _collect(resumed)
    assert len(continued) == len(uninterrupted) - stop_after
    for expected, actual in zip(uninterrupted[stop_after:], continued):
        for key in ("input_ids", "labels"):
            assert torch.equal(expected[key], actual[key])


def test_resume_is_constant_time(token_shards, monkeypatch):
    pattern, stream = token_shards([4000, 4000])
    loader = ShardLoader(pattern, block_size=4, per_device_batch_size=1)
    loader.load_state_dict({**loader.state_dict(), "position": 7000})
    reads = []
    original = type(loader.tokens).read_into
    monkeypatch.setattr(type(loader.tokens), "read_into", lambda self, out, start: reads.append(start) or original(self, out, start))
    batch = next(iter(loader))
    assert reads[0] == 7000 and all(start >= 7000 for start in reads)  # nothing before it is read
    np.testing.assert_array_equal(batch["input_ids"].flatten().numpy(), stream[7000:7004])


def test_resume_over_other_shards_is_refused(token_shards, tmp_path):
    pattern, _ = token_shards([100])
    state = ShardLoader(pattern, block_size=4, per_device_batch_size=1).state_dict()
    write_shard(tmp_path / "train_000001.bin", np.zeros(50, dtype=np.uint16))
    with pytest.raises(ShardError, match="saved over other shards: it lists 1 files with 100 tokens"):
        ShardLoader(pattern, block_size=4, per_device_batch_size=1).load_state_dict(state)


def test_float_side_channel_aligns_with_input_ids(token_shards, tmp_path):
    pattern, stream = token_shards([40, 40])
    weights = np.arange(80, dtype=np.float32) / 10
    write_shard(tmp_path / "weights_000000.bin", weights[:55])
    write_shard(tmp_path / "weights_000001.bin", weights[55:])
    loader = ShardLoader(pattern, block_size=4, per_device_batch_size=2, rank=1, world_size=2,
                         float_file_pattern=tmp_path / "weights_*.bin", float_key="loss_weights")
    for index, batch in enumerate(_collect(loader)):
        start = index * 16 + 8
        np.testing.assert_array_equal(batch["loss_weights"].flatten().numpy(), weights[start : start + 8])
        np.testing.assert_array_equal(batch["input_ids"].flatten().numpy(), stream[start : start + 8])


def test_misaligned_side_channel_is_refused(token_shards, tmp_path):
    pattern, _ = token_shards([40])
    write_shard(tmp_path / "weights_000000.bin", np.ones(39, dtype=np.float32))
    with pytest.raises(ShardError, match="hold 39 values, but the token shards .* hold 40"):
        ShardLoader(pattern, block_size=4, per_device_batch_size=1, float_file_pattern=tmp_path / "weights_*.bin")


def test_no_file_matches(tmp_path):
    with pytest.raises(ShardError, match="No file matches the pattern"):
        ShardLoader(tmp_path / "train_*.bin", block_size=4, per_device_batch_size=1)


def test_data_shorter_than_one_batch(token_shards):
    pattern, _ = token_shards([30])
    with pytest.raises(ShardError, match=r"gives 30 tokens \(train_000000.bin: 30\), fewer than one global batch of 64"):
        ShardLoader(pattern, block_size=8, per_device_batch_size=4, rank=0, world_size=2)


def test_global_batch_not_divisible_by_world_size(token_shards):
    pattern, _ = token_shards([100])
    with pytest.raises(ValueError, match="global_batch_size 6 does not divide evenly over the world size 4"):
        ShardLoader(pattern, block_size=4, global_batch_size=6, rank=0, world_size=4)


def test_token_at_or_above_the_vocab_size(token_shards, tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.uint16))
    write_shard(tmp_path / "train_000001.bin", np.array([1, 2, 99, 4, 5, 6, 7, 8], dtype=np.uint16))
    loader = ShardLoader(tmp_path / "train_*.bin", block_size=4, per_device_batch_size=1, vocab_size=50)
    with pytest.raises(ShardError, match=r"train_000001.bin: token 99 at position 2 is not below the vocab size 50"):
        _collect(loader)


def test_shards_are_mapped_one_read_at_a_time_and_never_kept(tmp_path, monkeypatch):
    """What keeps resident memory flat on huge shards: each read maps only its batch, and no map outlives it."""
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(2**20, dtype=np.uint64).astype(np.uint16))
    real_memmap, maps = ShardInfo.memmap, []

    def recording_memmap(self, start=0, stop=None):
        mapped = real_memmap(self, start, stop)
        maps.append((len(mapped), weakref.ref(mapped)))
        return mapped

    monkeypatch.setattr(ShardInfo, "memmap", recording_memmap)
    loader = ShardLoader(path, block_size=1024, per_device_batch_size=8)
    assert sum(1 for _ in loader) == 2**20 // (8 * 1024)
    gc.collect()
    assert maps and all(ref() is None for _, ref in maps)  # no map outlives its read
    assert max(size for size, _ in maps) <= 8 * 1024 + 1  # none spans more than one batch


TWO_RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from timl.data.loader import ShardLoader
    dist.init_process_group("gloo")
    loader = ShardLoader(sys.argv[1], block_size=4, per_device_batch_size=3)
    batches = [batch["input_ids"].flatten().tolist() for batch in loader]
    with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as file:
        json.dump({"world_size": loader.world_size, "batches": batches}, file)
    dist.destroy_process_group()
    """
)


def test_two_real_processes_over_gloo_split_each_global_batch(token_shards, tmp_path):
    pattern, stream = token_shards([100, 100])
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), pattern, str(tmp_path)],
        check=True, env=env, timeout=600, capture_output=True,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 200 // 24
    seen = [token for step in zip(ranks[0]["batches"], ranks[1]["batches"]) for part in step for token in part]
    assert seen == stream[: len(seen)].tolist()


def _stream_of(batches, key="input_ids"):
    return torch.cat([batch[key].flatten() for batch in batches]).numpy()


@pytest.mark.parametrize("lengths", [[50, 30], [45, 30], [5]])  # whole batches, a batch across epochs, data < a batch
def test_a_repeating_loader_reads_the_data_epoch_after_epoch(token_shards, lengths):
    pattern, stream = token_shards(lengths)
    loader = ShardLoader(pattern, block_size=4, per_device_batch_size=2, repeat=True)
    batches = _collect(loader, count=25)
    total = len(stream)
    np.testing.assert_array_equal(_stream_of(batches), np.tile(stream, 200 // total + 1)[:200])
    # Each label is the token after its input in the data; only the data's last token has none.
    data_positions = np.arange(200) % total
    expected = np.where(data_positions == total - 1, IGNORE_INDEX, stream.astype(np.int64)[(data_positions + 1) % total])
    np.testing.assert_array_equal(_stream_of(batches, "labels"), expected)
    assert loader.epoch == pytest.approx(200 / total) and loader.state_dict()["epoch"] == pytest.approx(200 / total)
    assert loader.progress() == {"epoch": loader.epoch}
    assert len(loader) == total // 8  # a pass's worth of batches, as a repeating loader's length


def _windows(batches) -> list[int]:
    """The data window (of 4 tokens) each one-sequence batch read, from its first token (the shard's values are unique)."""
    return [int(batch["input_ids"][0, 0]) // 4 for batch in batches]


@pytest.fixture
def counting_shards(tmp_path):
    """Shards whose token at data position p is p: which data a batch read is plain to see."""
    stream = np.arange(162, dtype=np.uint16)  # 40 windows of 4 tokens, and 2 tokens a shuffled epoch leaves out
    write_shard(tmp_path / "train_000000.bin", stream[:70])
    write_shard(tmp_path / "train_000001.bin", stream[70:])
    return str(tmp_path / "train_*.bin"), stream


def test_shuffling_permutes_the_windows_differently_every_epoch_and_the_same_every_run(counting_shards):
    pattern, stream = counting_shards
    make = lambda seed: ShardLoader(pattern, block_size=4, per_device_batch_size=1, repeat=True, shuffle=True, seed=seed)
    batches = _collect(make(0), count=120)
    epochs = [_windows(batches[start : start + 40]) for start in (0, 40, 80)]
    for order in epochs:
        assert sorted(order) == list(range(40))  # every window once per epoch; the 2 tokens past them never
    assert epochs[0] != list(range(40)) and len({tuple(order) for order in epochs}) == 3
    assert _windows(_collect(make(0), count=120)) == _windows(batches)
    assert _windows(_collect(make(1), count=40)) != epochs[0]
    for batch in batches:  # labels are the data's next token, even at a window's end
        start = int(batch["input_ids"][0, 0])
        np.testing.assert_array_equal(batch["labels"][0].numpy(), stream[start + 1 : start + 5])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [13, 40])  # mid-second epoch, and two epochs in, on another world size
def test_resume_mid_epoch_continues_identically_even_on_another_world_size(counting_shards, shuffle, stop_after):
    pattern, _ = counting_shards

    def make(world_size, rank=0):
        return ShardLoader(pattern, block_size=4, global_batch_size=2, rank=rank, world_size=world_size, repeat=True,
                           shuffle=shuffle, seed=7)

    uninterrupted = _collect(make(1), count=60)
    first = make(1)
    _collect(first, count=stop_after)
    assert first.epoch == pytest.approx(stop_after * 8 / (160 if shuffle else 162))
    state = json.loads(json.dumps(first.state_dict()))
    for world_size in (1, 2):
        ranks = []
        for rank in range(world_size):
            resumed = make(world_size, rank)
            resumed.load_state_dict(state)
            ranks.append(_collect(resumed, count=60 - stop_after))
        continued = [torch.cat([batches[step]["input_ids"] for batches in ranks]) for step in range(60 - stop_after)]
        for expected, actual in zip(uninterrupted[stop_after:], continued):
            assert torch.equal(expected["input_ids"], actual)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_shuffled_epoch_is_the_same_global_order_on_any_world_size(counting_shards, world_size):
    pattern, _ = counting_shards
    reference = _windows(_collect(ShardLoader(pattern, block_size=4, per_device_batch_size=1, repeat=True,
                                              shuffle=True), count=80))
    ranks = [_collect(ShardLoader(pattern, block_size=4, per_device_batch_size=4 // world_size, rank=rank,
                                  world_size=world_size, repeat=True, shuffle=True), count=20)
             for rank in range(world_size)]
    seen = [int(row[0]) // 4 for step in range(20) for batches in ranks for row in batches[step]["input_ids"]]
    assert seen == reference


def test_resume_in_another_data_order_is_refused(counting_shards):
    pattern, _ = counting_shards
    state = ShardLoader(pattern, block_size=4, per_device_batch_size=1, repeat=True).state_dict()
    shuffled = ShardLoader(pattern, block_size=4, per_device_batch_size=1, repeat=True, shuffle=True, seed=3)
    with pytest.raises(ShardError, match=r"another data order \(epoch_tokens 162 → 160, shuffle False → True, seed None → 3"):
        shuffled.load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_tokens", [37, 5])  # a partial last batch; a set smaller than one batch
def test_pad_last_yields_every_token_once_with_as_many_batches_on_every_rank(token_shards, world_size, num_tokens):
    pattern, stream = token_shards([num_tokens])
    per_rank = [_collect(ShardLoader(pattern, block_size=4, per_device_batch_size=2, rank=rank, world_size=world_size,
                                     pad_last=True)) for rank in range(world_size)]
    global_batch = 8 * world_size
    expected_batches = -(-num_tokens // global_batch)
    assert [len(batches) for batches in per_rank] == [expected_batches] * world_size
    assert len(ShardLoader(pattern, block_size=4, per_device_batch_size=2, rank=0, world_size=world_size,
                           pad_last=True)) == expected_batches
    inputs = np.concatenate([_stream_of([per_rank[r][k]]) for k in range(expected_batches) for r in range(world_size)])
    labels = np.concatenate([_stream_of([per_rank[r][k]], "labels") for k in range(expected_batches) for r in range(world_size)])
    np.testing.assert_array_equal(inputs[:num_tokens], stream)
    np.testing.assert_array_equal(labels[:num_tokens], np.append(stream[1:], IGNORE_INDEX))
    assert (inputs[num_tokens:] == 0).all() and (labels[num_tokens:] == IGNORE_INDEX).all()


def test_keyed_permutation_is_a_bijection_of_any_size():
    from timl.data.loader import KeyedPermutation

    for size in (1, 2, 3, 7, 64, 65, 1000):
        permutation = KeyedPermutation(size, key=size)
        assert sorted(permutation(index) for index in range(size)) == list(range(size))
    orders = {tuple(KeyedPermutation(50, key)(index) for index in range(50)) for key in range(5)}
    assert len(orders) == 5

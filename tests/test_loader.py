"""The shard loader: global batching, shifted labels, token limits, O(1) resume, side channel, memory, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
import torch

from timl.loader import IGNORE_INDEX, BatchLoader, ShardLoader
from timl.shards import ShardError, write_shard


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


def test_reading_a_large_shard_leaves_resident_memory_flat(tmp_path):
    num_tokens = 2**26  # 128 MiB of uint16
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(num_tokens, dtype=np.uint64).astype(np.uint16))
    process = psutil.Process()

    loader = ShardLoader(path, block_size=1024, per_device_batch_size=64)
    before = process.memory_info().rss
    count = sum(1 for _ in loader)
    loader_growth = process.memory_info().rss - before
    assert count == num_tokens // (64 * 1024)

    # The same pass through one long-lived map does grow resident memory, so the check above can fail.
    mapped = loader.tokens.shards[0].memmap()
    before = process.memory_info().rss
    total = sum(int(mapped[i : i + 65536].sum()) for i in range(0, num_tokens, 65536))
    naive_growth = process.memory_info().rss - before
    assert total > 0
    assert naive_growth > 100 * 2**20
    assert loader_growth < 16 * 2**20, f"resident memory grew by {loader_growth / 2**20:.1f} MiB"


TWO_RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from timl.loader import ShardLoader
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
        check=True, env=env, timeout=120, capture_output=True,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 200 // 24
    seen = [token for step in zip(ranks[0]["batches"], ranks[1]["batches"]) for part in step for token in part]
    assert seen == stream[: len(seen)].tolist()

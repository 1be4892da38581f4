"""The shard format: timl round trips, llm.c files read unchanged, and clear errors for bad files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from timl.data.shards import HEADER_BYTES, ShardError, count_values, list_shards, read_header, write_shard


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "float32"])
def test_round_trip_for_each_dtype(tmp_path, dtype):
    values = (np.arange(1000) * 37 % 65000).astype(dtype)
    path = tmp_path / "train_000000.bin"
    write_shard(path, values)
    kind = "floats" if dtype == "float32" else "tokens"
    info = read_header(path, kind)
    assert info.format == "timl" and info.dtype == np.dtype(dtype) and info.num_values == 1000
    np.testing.assert_array_equal(info.memmap(), values)
    np.testing.assert_array_equal(info.memmap(10, 20), values[10:20])


def test_header_is_the_original_timl_layout_byte_for_byte(tmp_path):
    path = tmp_path / "a.bin"
    write_shard(path, np.array([1, 2, 3], dtype=np.uint32))
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:4].tolist() == [20250805, 1, 1, 3]
    assert not header[4:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u4").tolist() == [1, 2, 3]


@pytest.mark.parametrize(("magic", "version", "dtype"), [(20240520, 1, "<u2"), (20240801, 7, "<u4")])
def test_llmc_shard_written_with_numpy_alone_reads_back(tmp_path, magic, version, dtype):
    tokens = np.random.default_rng(0).integers(0, 50257, size=5000).astype(dtype)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens))
    path = tmp_path / "fineweb_train_000001.bin"
    with open(path, "wb") as file:
        file.write(header.tobytes())
        file.write(tokens.tobytes())
    info = read_header(path)
    assert info.format.startswith("llm.c") and info.num_values == 5000
    np.testing.assert_array_equal(info.memmap(), tokens)


def test_count_values_reads_headers_of_the_glob(tmp_path):
    for index, length in enumerate([10, 20, 30]):
        write_shard(tmp_path / f"train_{index:06d}.bin", np.zeros(length, dtype=np.uint16))
    assert count_values(tmp_path / "train_*.bin") == 60
    assert [info.path.name for info in list_shards(tmp_path / "train_*.bin")] == [
        "train_000000.bin",
        "train_000001.bin",
        "train_000002.bin",
    ]


def test_a_rejected_array_writes_nothing(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.zeros(10, dtype=np.uint16))
    with pytest.raises(ShardError, match="uint16, uint32 or float32"):
        write_shard(tmp_path / "train_000001.bin", np.zeros(10, dtype=np.int64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_000000.bin"]


# The kernel kills this writer with SIGXFSZ (Python ignores it; this script restores the default) as soon as a write
# would take a file past 64 KiB: part-way through a 4 MiB shard, with no chance to clean up.
KILLED_MID_WRITE = """
import resource, signal, sys
import numpy as np
from timl.data.shards import write_shard

signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
write_shard(sys.argv[1], np.arange(2**20, dtype=np.uint32))
"""


def test_a_writer_killed_mid_write_leaves_no_shard_that_a_glob_finds(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(10, dtype=np.uint32))
    root = Path(__file__).resolve().parents[2]
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path / "train_000001.bin")],
                            env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr
    [partial] = [path for path in tmp_path.iterdir() if path.name != "train_000000.bin"]
    assert 0 < partial.stat().st_size < HEADER_BYTES + 4 * 2**20  # the kill came mid-write
    assert not (tmp_path / "train_000001.bin").exists()
    assert [info.path.name for info in list_shards(tmp_path / "train_*.bin")] == ["train_000000.bin"]


def _write_raw(path, header_values, payload: bytes):
    header = np.zeros(256, dtype="<i4")
    header[: len(header_values)] = header_values
    path.write_bytes(header.tobytes() + payload)
    return path


def test_no_file_matches(tmp_path):
    with pytest.raises(ShardError, match=r"No file matches the pattern .*nothing_\*\.bin"):
        list_shards(tmp_path / "nothing_*.bin")


@pytest.mark.parametrize(
    ("header", "payload", "message"),
    [
        ((12345, 1, 0, 2), b"\0" * 4, "unknown magic number 12345"),
        ((20250805, 2, 0, 2), b"\0" * 4, "timl shard version 2 is not supported"),
        ((20250805, 1, 7, 2), b"\0" * 4, "dtype id 7 is not a tokens dtype"),
        ((20250805, 1, 0, 10), b"\0" * 4, "truncated: its header promises 10 uint16 values"),
        ((20250805, 1, 0, 2), b"\0" * 6, "padded: its header promises 2 uint16 values"),
        ((20240520, 3, 2), b"\0" * 4, "llm.c GPT-2 shard version 3 is not supported"),
        ((20240801, 7, 2), b"\0" * 4, "truncated"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, header, payload, message):
    path = _write_raw(tmp_path / "bad.bin", header, payload)
    with pytest.raises(ShardError, match=message) as error:
        read_header(path)
    assert str(path) in str(error.value)


def test_file_shorter_than_a_header(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ShardError, match="too short to hold the 1024-byte shard header"):
        read_header(path)


def test_float_dtype_ids_differ_from_token_ids(tmp_path):
    path = tmp_path / "weights.bin"
    write_shard(path, np.ones(4, dtype=np.float32))
    assert read_header(path, "floats").dtype == np.float32
    # Read as tokens, id 0 means uint16, so the size no longer agrees with the header.
    with pytest.raises(ShardError, match="padded"):
        read_header(path, "tokens")

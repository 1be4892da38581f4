"""Whatever timl writes is, after a crash or a kill, either whole or absent; and it is fsynced before it appears."""

import fnmatch
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from timl.checkpoint.durable import (atomic_directory, atomic_file, publish_directory, remove_directory, synced_file,
                                     temporary_directory, temporary_path)
from timl.checkpoint.upload import IGNORE_PATTERNS

ROOT = Path(__file__).resolve().parents[2]

# Writes a 64 MiB file a slice at a time, announcing with a file that it has started; the test kills it mid-write.
SLOW_WRITER = """
import sys, time
from pathlib import Path
from timl.checkpoint.durable import atomic_file

final, started = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_file(final) as file:
    for index in range(1024):
        file.write(b"n" * 65536)
        file.flush()
        if index == 0:
            started.touch()
        time.sleep(0.05)
"""


def test_a_file_killed_mid_write_is_absent_or_whole(tmp_path):
    for previous in (None, b"old" * 1000):
        final, started = tmp_path / f"data_{len(previous or b'')}.bin", tmp_path / f"started_{len(previous or b'')}"
        if previous is not None:
            with atomic_file(final) as file:
                file.write(previous)
        writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(final), str(started)],
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while not started.exists():
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()[1]
            time.sleep(0.02)
        writer.send_signal(signal.SIGKILL)
        writer.communicate()

        [temporary] = tmp_path.glob(f".{final.name}.*.tmp")
        assert temporary.stat().st_size > 0  # the kill came mid-write
        assert (final.read_bytes() if final.exists() else None) == previous


def test_a_temporary_never_matches_a_glob_for_final_names(tmp_path):
    final = tmp_path / "train_000001.bin"
    for temporary in (temporary_path(final, per_process=True), temporary_path(final, per_process=False)):
        assert temporary.parent == tmp_path and temporary.name.startswith(".")
        assert not fnmatch.fnmatch(temporary.name, "train_*.bin")
        assert any(fnmatch.fnmatch(temporary.name, pattern) for pattern in IGNORE_PATTERNS)  # never uploaded
    with atomic_file(final) as file:
        file.write(b"half")
        for pattern in ("train_*.bin", "*.bin", "*"):  # glob's patterns, as list_shards uses them
            assert glob.glob(str(tmp_path / pattern)) == []
    assert [path.name for path in tmp_path.iterdir()] == ["train_000001.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "metrics.jsonl"
    final.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_file(final, "w") as file:
        file.write("new\n")
        raise RuntimeError("the writer failed")
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.jsonl"] and final.read_text() == "old\n"


def test_publishing_a_folder_replaces_the_existing_one_whole(tmp_path):
    final = tmp_path / "main"
    (final / "nested").mkdir(parents=True)
    (final / "stale.json").write_text("{}")
    (final / "nested" / "stale.bin").write_bytes(b"old")
    (tmp_path / ".main.deleting").mkdir()  # a leftover of a crash mid-delete
    with atomic_directory(final) as temporary:
        assert temporary == tmp_path / ".main.tmp"
        (temporary / "model.safetensors").write_bytes(b"new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["main"]
    assert [path.name for path in final.iterdir()] == ["model.safetensors"]

    with pytest.raises(RuntimeError), atomic_directory(final) as temporary:
        (temporary / "half.bin").write_bytes(b"half")
        raise RuntimeError("the export failed")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["main"]
    assert (final / "model.safetensors").read_bytes() == b"new"


def test_a_removed_folder_is_gone_even_past_a_leftover_of_an_earlier_removal(tmp_path):
    for name in ("step2", ".step2.deleting"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_bytes(b"x")
    remove_directory(tmp_path / "step2")
    assert list(tmp_path.iterdir()) == []


def record_fsyncs_and_renames(monkeypatch) -> list[tuple]:
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", Path(source), Path(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_file_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path, monkeypatch):
    events = record_fsyncs_and_renames(monkeypatch)
    final = tmp_path / "shard.bin"
    with atomic_file(final) as file:
        file.write(b"whole")
    temporary = temporary_path(final, per_process=True)
    assert events == [("fsync", temporary), ("replace", temporary, final), ("fsync", tmp_path)]


def test_a_folder_is_fsynced_file_by_file_then_renamed_then_its_parent_fsynced(tmp_path, monkeypatch):
    final = tmp_path / "step4"
    final.mkdir()
    temporary = temporary_directory(final, per_process=False)
    (temporary / "nested").mkdir()
    for path in (temporary / "trainer_state.json", temporary / "nested" / "model.bin"):
        path.write_text("whole")
    events = record_fsyncs_and_renames(monkeypatch)
    publish_directory(temporary, final)

    [renamed] = [index for index, event in enumerate(events) if event[0] == "replace" and event[2] == final]
    synced = {path for kind, path, *_ in events[:renamed] if kind == "fsync"}
    assert {temporary / "trainer_state.json", temporary / "nested" / "model.bin", temporary / "nested",
            temporary} <= synced
    assert events[renamed + 1:] == [("fsync", tmp_path)]  # the rename made durable; the old folder then deleted


def test_a_file_inside_a_folder_published_whole_is_fsynced_in_place(tmp_path, monkeypatch):
    events = record_fsyncs_and_renames(monkeypatch)
    with synced_file(tmp_path / "rng_state_0.pt") as file:
        file.write(b"state")
    assert events == [("fsync", tmp_path / "rng_state_0.pt")]
    assert [path.name for path in tmp_path.iterdir()] == ["rng_state_0.pt"]

"""The one way timl writes a file or a folder, so that a crash or a kill never leaves a half-written one that looks
valid, and a power loss never takes back one that was published.

A file: write it under a hidden temporary name in the same folder, flush and fsync it, os.replace it onto its final
name (atomic within one filesystem), then fsync the folder, which makes the rename itself durable. `atomic_file` does
all of it; `publish_file` does the last steps for a file that a library wrote (save_pretrained).

A folder: build it under a hidden temporary name beside its final one, fsync every file (and folder) in it, rename it
into place, then fsync the parent. A folder cannot be renamed over a non-empty one, so an existing folder is first
renamed aside to a hidden name and deleted once the new one is in place. `atomic_directory` does all of it; a
checkpoint, which every rank writes into, uses `temporary_directory` and `publish_directory` separately.

A file inside a folder that is published whole needs no rename of its own: the folder's rename makes it appear. It is
written in place with `synced_file`, which fsyncs it: on a shared filesystem the fsync that publish_directory makes on
one node may not reach what another node wrote, so each process syncs its own files.

Every temporary name comes from `temporary_path`: a leading dot and a `.tmp` suffix, so that no glob for final names
(`train_*.bin`, `step*`) matches it, and uploads skip it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(final: str | os.PathLike, *, per_process: bool) -> Path:
    """The hidden temporary beside `final`: `.{name}.{pid}.tmp` per process, else `.{name}.tmp`.

    Per process, two processes that write the same file at once (tokenize jobs sharing a cache_dir) never write into
    one temporary: each publishes a whole file, and the last rename wins. The fixed name is for a folder that several
    processes fill (a checkpoint's ranks must all find it) and whose leftover a later attempt must clear.
    """
    final = Path(final)
    tag = f".{os.getpid()}" if per_process else ""
    return final.with_name(f".{final.name}{tag}{TEMPORARY_SUFFIX}")


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def fsync_directory(path: str | os.PathLike) -> None:
    """Makes the folder's entries durable: a file renamed into it, or a folder renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def synced_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens `path` in place and fsyncs it once written: for a file inside a folder that is published whole."""
    with open(path, mode) as file:
        yield file
        file.flush()
        os.fsync(file.fileno())


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens a temporary for `path` and publishes it there once the block ends; an exception removes it instead,
    leaving whatever `path` held before."""
    path = Path(path)
    temporary = temporary_path(path, per_process=True)
    try:
        with open(temporary, mode) as file:
            yield file
        publish_file(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def publish_file(temporary: str | os.PathLike, final: str | os.PathLike) -> None:
    """Moves a finished file onto `final` durably: fsynced first, so a reader sees the whole file or none."""
    fsync_file(temporary)
    os.replace(temporary, final)
    fsync_directory(Path(final).parent)


def write_json(path: str | os.PathLike, value: Any,
               open_file: Callable[[Path, str], AbstractContextManager[IO[Any]]] = atomic_file) -> None:
    """Writes `value` as indented JSON (what JSON cannot hold, as str), atomically; `open_file=synced_file` writes it
    in place instead, inside a folder that is published whole."""
    with open_file(Path(path), "w") as file:
        file.write(json.dumps(value, indent=2, default=str) + "\n")


def temporary_directory(final: str | os.PathLike, *, per_process: bool) -> Path:
    """Creates the empty temporary folder for `final` (see temporary_path), first removing a leftover of a crash."""
    temporary = temporary_path(final, per_process=per_process)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    return temporary


def publish_directory(temporary: str | os.PathLike, final: str | os.PathLike) -> None:
    """fsyncs every file and folder in `temporary`, then renames it to `final`, replacing any folder there."""
    temporary, final = Path(temporary), Path(final)
    for folder, _, files in os.walk(temporary):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_directory(folder)
    old = _set_aside(final) if final.exists() else None
    os.replace(temporary, final)
    fsync_directory(final.parent)
    if old is not None:
        # The new folder is in place: an old copy left behind is cleared by the next _set_aside of this name.
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder to fill, and publishes it onto `final` once the block ends; an exception
    removes it instead, leaving whatever `final` held before."""
    temporary = temporary_directory(final, per_process=False)
    try:
        yield temporary
        publish_directory(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def remove_directory(path: str | os.PathLike) -> None:
    """Deletes a folder, renamed to a hidden name first: a crash mid-delete leaves a hidden folder, never a visible
    one missing files."""
    shutil.rmtree(_set_aside(Path(path)))


def _set_aside(path: Path) -> Path:
    aside = path.with_name(f".{path.name.lstrip('.')}.deleting")
    shutil.rmtree(aside, ignore_errors=True)  # a leftover of a crash mid-delete, which the rename could not replace
    os.replace(path, aside)
    return aside

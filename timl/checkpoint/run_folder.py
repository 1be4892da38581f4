"""One run per output folder.

A fresh run refuses a folder that already holds another run's checkpoints or metrics (unless told to overwrite it),
so that two histories never mix and `--resume_from_checkpoint latest` never picks up another run. While a run is
live, its main process holds an exclusive lock on the folder, so that a second run cannot write there at the same
time. The lock is an OS file lock: the kernel drops it when the process dies, even by `kill -9`, so a lock left by a
dead run is noticed as stale and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from timl.checkpoint.durable import remove_directory
from timl.errors import RunError

logger = logging.getLogger(__name__)

LOCK_FILE = ".timl.lock"
# What a run leaves in output_dir: its checkpoints, the exported model, its log and config, and the hidden
# folders of unfinished, abandoned or half-deleted checkpoints.
RUN_ENTRY = re.compile(r"step\d+|main|metrics\.jsonl|run_config\.json|\.(step\d+|main)\..+")
VISIBLE_RUN_ENTRY = re.compile(r"step\d+|main|metrics\.jsonl")


class RunFolderError(RunError):
    """The output folder belongs to another run."""


def run_entries(output_dir: str | Path, pattern: re.Pattern[str] = VISIBLE_RUN_ENTRY) -> list[Path]:
    """The entries of output_dir that a run wrote, sorted by name."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(path for path in output_dir.iterdir() if pattern.fullmatch(path.name))


def another_run_problems(output_dir: str | Path) -> list[str]:
    """Why a fresh run may not start in output_dir: it holds another run's checkpoints or metrics (or nothing)."""
    found = run_entries(output_dir)
    if not found:
        return []
    names = ", ".join(path.name for path in found[:5]) + (", ..." if len(found) > 5 else "")
    return [f"--output_dir {output_dir} holds another run ({names}). Continue it with --resume_from_checkpoint "
            f"latest, start this run in a new --output_dir, or pass --overwrite_output_dir true to delete that run "
            f"and start afresh"]


def clear_previous_run(output_dir: str | Path) -> list[Path]:
    """Deletes what a previous run wrote into output_dir (--overwrite_output_dir); other files stay."""
    removed = run_entries(output_dir, RUN_ENTRY)
    for path in removed:
        if path.is_dir():
            remove_directory(path)
        else:
            path.unlink()
    if removed:
        logger.warning("--overwrite_output_dir: deleted the previous run in %s (%s).", output_dir,
                       ", ".join(path.name for path in removed))
    return removed


class RunLock:
    """An exclusive lock on output_dir for one live run, held by its main process from `acquire` to `release`.

    The lock file names its holder (host, pid, start time), so that a refused run can say which run holds it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A filesystem without locks (some network mounts): the check cannot be made, so say so.
                logger.warning("Cannot lock %s (%s): nothing stops a second run from writing into %s.", self.path,
                               error, self.path.parent)
                return
            raise RunFolderError(
                f"--output_dir {self.path.parent} is in use by another live run ({_describe(holder)}): two runs "
                f"must not write one folder. Wait for it to end, stop it, or choose another --output_dir.") from None
        stale = _read_holder(fd)
        if stale:
            logger.warning("%s names %s, which no longer holds it (the run ended without releasing it): taking it "
                           "over.", self.path, _describe(stale))
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # a released lock names nobody
        finally:
            os.close(fd)  # closing drops the lock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, object]:
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, object]) -> str:
    if not holder:
        return "a process that did not say which"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"

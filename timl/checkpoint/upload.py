"""Checkpoint uploads from a separate process, so that training never waits for the network.

The Trainer's main process submits each finished checkpoint folder to an `Uploader`; a spawned worker uploads it to
an `UploadTarget` (a Hub model repo, or a local or mounted folder) as its own revision, and retries with backoff.
The worker's log records and results come back over one queue, which a daemon thread in the main process reads:
records go to the main process's handlers, results update what is still pending.

Only the trainer ends the worker. Launchers stop a job by signalling whole process groups (torchrun and `accelerate
launch` killpg each worker's group with SIGTERM, then SIGKILL 30 s later) and SLURM signals every process of the job,
so the worker also receives the SIGTERM meant for the trainer; it ignores that one and exits only on its parent's
SIGTERM (`Uploader.close` when its time is up, or multiprocessing's cleanup at exit). The trainer meanwhile saves and
gives the pending uploads their grace period. The launchers' SIGKILL still ends everything, the worker included.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from timl.checkpoint.durable import TEMPORARY_SUFFIX, atomic_directory

logger = logging.getLogger(__name__)

IGNORE_PATTERNS = (f"*{TEMPORARY_SUFFIX}",)
"""Files never uploaded: leftovers of interrupted writes."""

REDACTED = "<redacted>"
_PROGRESS_SECONDS = 30.0


class UploadTarget(Protocol):
    """Where checkpoints go. A target is pickled into the upload process, so it must be small and picklable; one
    that holds a secret also has `secrets() -> list[str]`, the strings the upload process must never emit."""

    def upload(self, folder: Path, revision: str) -> None:
        """Uploads the files of `folder` as `revision`; raises if that fails."""


class HubTarget:
    """A Hugging Face Hub model repo, created if missing: `main` is its main branch, any other revision a branch.

    `token` None means the one huggingface_hub finds by itself (HF_TOKEN, or the cached login).
    """

    def __init__(self, repo_id: str, token: str | None = None, private: bool | None = None):
        self.repo_id, self.token, self.private = repo_id, token, private

    def __repr__(self) -> str:
        # Without the token: reprs end up in logs and tracebacks.
        return f"HubTarget(repo_id={self.repo_id!r}, private={self.private!r})"

    def secrets(self) -> list[str]:
        from huggingface_hub import get_token

        token = self.token or get_token()
        return [token] if token else []

    def upload(self, folder: Path, revision: str) -> None:
        from huggingface_hub import HfApi

        api = HfApi(token=self.token)
        api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
        if revision != "main":
            api.create_branch(self.repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=self.repo_id, folder_path=folder, revision=revision,
                          commit_message=f"Upload {folder.name} as {revision}", ignore_patterns=list(IGNORE_PATTERNS))


class LocalTarget:
    """A local or mounted folder, for clusters without Hub access: revision R becomes `destination/R/`, whole."""

    def __init__(self, destination: str | Path):
        self.destination = Path(destination)

    def __repr__(self) -> str:
        return f"LocalTarget({str(self.destination)!r})"

    def upload(self, folder: Path, revision: str) -> None:
        # Published as a whole folder, so that readers never see a half-written revision.
        with atomic_directory(self.destination / revision) as temporary:
            shutil.copytree(folder, temporary, ignore=shutil.ignore_patterns(*IGNORE_PATTERNS), dirs_exist_ok=True)


def upload_target(hub_target: str | None, hub_model_id: str | None, hub_token: str | None = None,
                  hub_private: bool | None = None) -> UploadTarget:
    """The target that --hub_target names: "hub" (or None) for the Hub repo `hub_model_id`, else a folder path."""
    if hub_target in (None, "hub"):
        if not hub_model_id:
            raise ValueError("Uploading to the Hub needs --hub_model_id (or a folder as --hub_target).")
        return HubTarget(hub_model_id, token=hub_token, private=hub_private)
    return LocalTarget(hub_target)


@dataclass(frozen=True)
class UploadFailure:
    folder: Path
    revision: str
    error: str


class Uploader:
    """Uploads checkpoint folders from a spawned process (the trainer has CUDA initialised, so fork is unsafe).

    `submit` returns at once. At most `max_pending` uploads are queued or in flight. When that many are, an
    intermediate checkpoint is skipped with a warning (it stays on disk, and a later one supersedes it), while a final
    one (`final=True`, or revision "main") waits for room. A failed upload is tried `attempts` times in all, waiting
    `backoff_seconds`, then twice as long each time; it never raises in the trainer and never touches the local
    folder. `close(timeout)` waits for the pending uploads, logging progress, and returns the failures.

    The worker logs at the main process's levels, and its records (secrets redacted) go to the main's handlers.
    """

    def __init__(self, target: UploadTarget, max_pending: int = 2, attempts: int = 5, backoff_seconds: float = 2.0):
        if max_pending < 1 or attempts < 1:
            raise ValueError(f"max_pending ({max_pending}) and attempts ({attempts}) must be at least 1.")
        self.target, self.max_pending = target, max_pending
        context = multiprocessing.get_context("spawn")
        self._tasks, self._results = context.Queue(), context.Queue()
        self._pending: dict[int, tuple[Path, str]] = {}
        self._failures: list[UploadFailure] = []
        self._submitted, self._closed = 0, False
        self._changed = threading.Condition()
        self._stop_reading = threading.Event()
        levels = {"": logging.getLogger().getEffectiveLevel(), __name__: logger.getEffectiveLevel()}
        self._process = context.Process(target=_work, name="timl-upload", daemon=True,
                                        args=(target, self._tasks, self._results, levels, attempts, backoff_seconds))
        # The new process inherits this thread's signal mask: with SIGTERM blocked from its first instruction, the
        # threads that libraries start while it imports (OpenBLAS's, say) block it too, so only its watcher sees it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._reader = threading.Thread(target=self._read_results, name="timl-upload-results", daemon=True)
        self._reader.start()

    def submit(self, folder: str | Path, revision: str, final: bool = False) -> bool:
        """Queues `folder` for upload as `revision`; returns whether it was queued (see the class doc for when not)."""
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"No checkpoint folder at {folder}.")
        with self._changed:
            if self._closed:
                raise RuntimeError("The uploader is closed.")
            if (final or revision == "main") and self._full():
                logger.info("The upload queue is full; waiting for room to upload %s as %s.", folder, revision)
                while self._full() and self._process.is_alive():
                    self._changed.wait(timeout=1.0)
            if not self._process.is_alive():
                logger.error("The upload process has exited (code %s): %s is not uploaded as %s.",
                             self._process.exitcode, folder, revision)
                return False
            if self._full():
                logger.warning("Skipping the upload of %s as %s: %d upload(s) still pending (max_pending=%d): %s. "
                               "It stays on disk; a later checkpoint supersedes it.", folder, revision,
                               len(self._pending), self.max_pending, _describe(self._pending.values()))
                return False
            task_id, self._submitted = self._submitted, self._submitted + 1
            self._pending[task_id] = (folder, revision)
        self._tasks.put((task_id, folder, revision))
        logger.info("Queued %s for upload as %s.", folder, revision)
        return True

    def pending(self) -> set[Path]:
        """The folders queued or uploading: deleting old checkpoints must leave these alone."""
        with self._changed:
            return {folder for folder, _ in self._pending.values()}

    def is_pending(self, folder: str | Path) -> bool:
        return Path(folder).resolve() in self.pending()

    def close(self, timeout: float | None = None) -> list[UploadFailure]:
        """Waits up to `timeout` seconds (None: as long as it takes) for the pending uploads, then stops the worker,
        terminating it if the time is up. Returns the uploads that failed or did not finish, and logs them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            if not self._closed:
                self._closed = True
                self._tasks.put(None)
            next_report = time.monotonic()
            while self._pending and self._process.is_alive() and (deadline is None or time.monotonic() < deadline):
                if time.monotonic() >= next_report:
                    logger.info("Waiting for %d checkpoint upload(s) to finish%s: %s.", len(self._pending),
                                "" if deadline is None else f" (at most {deadline - time.monotonic():.0f} s more)",
                                _describe(self._pending.values()))
                    next_report += _PROGRESS_SECONDS
                self._changed.wait(timeout=1.0)
        self._process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        stopped = f"exited with code {self._process.exitcode}"
        if self._process.is_alive():
            if self._pending:
                logger.error("Closing the uploader timed out after %s s: terminating the upload process.", timeout)
            self._process.terminate()
            self._process.join()
            stopped = f"was terminated when close timed out after {timeout} s"
        self._stop_reading.set()
        self._reader.join(timeout=5.0)
        with self._changed:
            self._failures += [UploadFailure(folder, revision, f"not finished: the upload process {stopped}")
                               for folder, revision in self._pending.values()]
            self._pending.clear()
            failures = list(self._failures)
        if failures:
            listed = "\n".join(f"  {failure.folder} as {failure.revision}: {failure.error}" for failure in failures)
            logger.error("%d checkpoint upload(s) failed; the local folders are kept:\n%s", len(failures), listed)
        return failures

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _full(self) -> bool:
        return len(self._pending) >= self.max_pending

    def _read_results(self) -> None:
        # Polls rather than waiting for a sentinel: a terminated worker may have left a message half-written.
        while True:
            try:
                item = self._results.get(timeout=0.1)
            except queue.Empty:
                if self._stop_reading.is_set():
                    return
                continue
            if isinstance(item, logging.LogRecord):
                logging.getLogger(item.name).handle(item)
                continue
            task_id, error = item
            with self._changed:
                folder, revision = self._pending.pop(task_id)
                if error is not None:
                    self._failures.append(UploadFailure(folder, revision, error))
                self._changed.notify_all()


def _describe(uploads: Iterable[tuple[Path, str]]) -> str:
    return ", ".join(f"{folder} as {revision}" for folder, revision in uploads)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class _RedactingQueueHandler(logging.handlers.QueueHandler):
    def __init__(self, results: multiprocessing.Queue, secrets: list[str]):
        super().__init__(results)
        self.secrets = secrets

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The base class merges the arguments and the traceback into the message, so this covers all of them.
        record = super().prepare(record)
        record.msg = record.message = redact(record.msg, self.secrets)
        return record


def _work(target: UploadTarget, tasks: multiprocessing.Queue, results: multiprocessing.Queue, levels: dict[str, int],
          attempts: int, backoff_seconds: float) -> None:
    """The upload process: uploads what `tasks` holds until None, and puts log records and results on `results`."""
    # Ctrl-C reaches the whole process group; the trainer decides what becomes of the uploads, through close().
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Blocked before any thread starts, so that every thread inherits the mask and only the watcher receives SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="timl-upload-sigterm",
                     daemon=True).start()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # progress bars from a background process garble the console
    secrets = target.secrets() if hasattr(target, "secrets") else []
    logging.getLogger().handlers = [_RedactingQueueHandler(results, secrets)]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)
    for task_id, folder, revision in iter(tasks.get, None):
        try:
            with loadable_model(Path(folder)) as upload_folder:
                error = upload_with_retries(target, upload_folder, revision, attempts, backoff_seconds)
        except Exception as export_error:  # noqa: BLE001 -- reported as this upload's failure
            error = f"exporting {folder} as a Hugging Face model failed: {export_error!r}"
        results.put((task_id, None if error is None else redact(error, secrets)))


@contextlib.contextmanager
def loadable_model(folder: Path) -> Iterator[Path]:
    """The folder to upload: a step{N} training checkpoint (sharded DCP state) is first exported beside it as a
    Hugging Face model, here in the upload process so that training never waits for it; main/ is one already."""
    if not (folder / ".metadata").is_file():
        yield folder
        return
    from timl.checkpoint.state import export_hf_model

    staging = folder.with_name(f".{folder.name}.export")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield export_hf_model(folder, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _exit_on_sigterm_from(parent: int) -> None:
    """The upload process's SIGTERM watcher: the parent's SIGTERM ends the process as SIGTERM does, anyone else's (a
    launcher's or a scheduler's, meant for the trainer) is logged and ignored."""
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.raise_signal(signal.SIGTERM)
        logger.info("The upload process ignores the SIGTERM from process %d: the trainer ends it once the pending "
                    "uploads are done or their time is up.", sender)


def upload_with_retries(target: UploadTarget, folder: Path, revision: str, attempts: int, backoff_seconds: float,
                        sleep: Callable[[float], None] = time.sleep) -> str | None:
    """Returns None once uploaded, or the last error after `attempts` failures; between tries it calls `sleep` with
    `backoff_seconds`, then twice as long each time."""
    for attempt in range(1, attempts + 1):
        start = time.perf_counter()
        try:
            target.upload(folder, revision)
        except Exception as error:
            if attempt == attempts:
                logger.exception("Upload of %s as %s failed %d times; giving up.", folder, revision, attempts)
                return f"{type(error).__name__}: {error}"
            delay = backoff_seconds * 2 ** (attempt - 1)
            logger.warning("Upload of %s as %s failed (attempt %d of %d): %s: %s; retrying in %.3g s.", folder,
                           revision, attempt, attempts, type(error).__name__, error, delay)
            sleep(delay)
        else:
            logger.info("Uploaded %s as %s in %.1f s.", folder, revision, time.perf_counter() - start)
            return None

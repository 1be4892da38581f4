"""Upload targets for the upload tests, in a module of their own so that the spawned upload process imports them, and
the helpers that sequence them: files that say what has happened, never sleeps that guess how long it takes."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
from huggingface_hub import set_client_factory

from timl.checkpoint.upload import HubTarget, LocalTarget


PATIENCE_SECONDS = 120.0
"""How long a helper waits for a file before it gives up: only a broken test ever waits that long."""


def wait_for_file(path: Path, process: subprocess.Popen | None = None) -> None:
    """Returns once `path` exists; fails if `process` ends first or PATIENCE_SECONDS pass."""
    deadline = time.monotonic() + PATIENCE_SECONDS
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited with code {process.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {PATIENCE_SECONDS} s")
        time.sleep(0.01)


class GatedTarget(LocalTarget):
    """Creates the file `started` as an upload begins, then copies only once the file `gate` exists: the test decides
    when an upload can finish. A gate never opened fails the upload after PATIENCE_SECONDS."""

    def __init__(self, destination: Path, started: Path, gate: Path):
        super().__init__(destination)
        self.started, self.gate = started, gate

    def upload(self, folder: Path, revision: str) -> None:
        self.started.touch()
        wait_for_file(self.gate)
        super().upload(folder, revision)


@contextlib.contextmanager
def open_gate_when_logged(gate: Path, message_start: str,
                          before_opening: Callable[[], None] | None = None) -> Iterator[None]:
    """Creates `gate` when timl.checkpoint.upload logs a message starting with `message_start` (in this process, or in the upload
    process, whose records come here): an upload that finishes only once the uploader has reached that point.
    `before_opening`, if given, is called first, there: a test looks at what that point holds."""

    class GateOpener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(message_start):
                if before_opening is not None:
                    before_opening()
                gate.touch()

    log, opener = logging.getLogger("timl.checkpoint.upload"), GateOpener()
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(opener)
    try:
        yield
    finally:
        log.removeHandler(opener)
        log.setLevel(level)


class FlakyTarget(LocalTarget):
    """Fails its first `failures` attempts. Attempts are counted in files, since they happen in another process."""

    def __init__(self, destination: Path, attempts_folder: Path, failures: int):
        super().__init__(destination)
        self.attempts_folder, self.failures = attempts_folder, failures

    def upload(self, folder: Path, revision: str) -> None:
        attempt = len(list(self.attempts_folder.iterdir())) + 1
        (self.attempts_folder / f"{revision}.{attempt}").touch()
        if attempt <= self.failures:
            raise ConnectionError(f"attempt {attempt}: the network is down")
        super().upload(folder, revision)


class FakeHub:
    """The Hub's HTTP endpoints that an upload calls, answered in memory; each request is recorded.

    `reject=True` answers 401 to everything, quoting the request's Authorization header back in the error, as a
    careless server might: the uploader must redact it.
    """

    def __init__(self, reject: bool = False):
        self.reject = reject
        self.requests: list[httpx2.Request] = []

    def install(self) -> None:
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self.answer)))

    def answer(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if self.reject:
            return httpx2.Response(401, json={"error": f"Invalid credentials: {request.headers.get('authorization')}"})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": file["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for file in files]})
        if "/commit/" in path:
            repo_url = "https://huggingface.co/" + "/".join(path.split("/")[3:5])
            return httpx2.Response(200, json={"commitUrl": f"{repo_url}/commit/0123abcd", "commitOid": "0123abcd"})
        return httpx2.Response(404, json={"error": f"FakeHub does not serve {request.method} {path}"})


class RejectedHubTarget(HubTarget):
    """A HubTarget whose process talks to a FakeHub that rejects the token."""

    def upload(self, folder: Path, revision: str) -> None:
        FakeHub(reject=True).install()
        super().upload(folder, revision)

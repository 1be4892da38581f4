"""Upload targets for tests/test_upload.py, in a module of their own so that the spawned upload process imports them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx2
from huggingface_hub import set_client_factory

from timl.upload import HubTarget, LocalTarget


class SlowTarget(LocalTarget):
    def __init__(self, destination: Path, seconds: float):
        super().__init__(destination)
        self.seconds = seconds

    def upload(self, folder: Path, revision: str) -> None:
        time.sleep(self.seconds)
        super().upload(folder, revision)


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

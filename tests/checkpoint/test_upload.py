"""The uploader, with real worker processes, real queues and real files; only the Hub's HTTP is faked (below).

Uploads that must still be running at some point wait for a gate file (upload_targets.GatedTarget), which the test
creates once that point has passed: the tests check what happened before what, never how long it took.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi, set_client_factory
from huggingface_hub.utils._http import default_client_factory
from upload_targets import FakeHub, FlakyTarget, GatedTarget, RejectedHubTarget, open_gate_when_logged, wait_for_file

from timl.checkpoint.upload import REDACTED, HubTarget, LocalTarget, Uploader, upload_target, upload_with_retries

TOKEN = "hf_NotARealTokenButSecretAllTheSame"


def write_checkpoint(folder: Path, step: int) -> Path:
    checkpoint = folder / f"step{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"step": step}))
    (checkpoint / "model.safetensors").write_bytes(os.urandom(1000) + bytes([step % 256]))
    return checkpoint


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def worker_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records that came from the upload process into this process's log."""
    return [record for record in caplog.records if record.process != os.getpid()]


@pytest.fixture
def checkpoints(tmp_path):
    return [write_checkpoint(tmp_path / "output", step) for step in (100, 200, 300)]


def test_each_checkpoint_lands_as_its_revision_and_the_local_copies_stay(tmp_path, checkpoints):
    destination = tmp_path / "uploads"
    (checkpoints[0] / "half-written.tmp").write_text("never uploaded")
    originals = [contents(checkpoint) for checkpoint in checkpoints]
    with Uploader(LocalTarget(destination), max_pending=4) as uploader:
        for checkpoint in checkpoints:
            assert uploader.submit(checkpoint, checkpoint.name)
        assert uploader.submit(checkpoints[-1], "main", final=True)
        failures = uploader.close(timeout=600)
    assert failures == [] and uploader.pending() == set()
    assert sorted(path.name for path in destination.iterdir()) == ["main", "step100", "step200", "step300"]
    originals[0].pop("half-written.tmp")
    for checkpoint, original in zip(checkpoints, originals):
        assert contents(destination / checkpoint.name) == original
    assert contents(destination / "main") == originals[-1]
    assert contents(checkpoints[0]) == {**originals[0], "half-written.tmp": b"never uploaded"}
    assert [contents(checkpoint) for checkpoint in checkpoints[1:]] == originals[1:]


def test_a_local_target_replaces_a_revision_whole(tmp_path, checkpoints):
    target = LocalTarget(tmp_path / "uploads")
    target.upload(checkpoints[0], "main")
    (checkpoints[1] / "config.json").unlink()
    target.upload(checkpoints[1], "main")
    assert contents(tmp_path / "uploads" / "main") == contents(checkpoints[1])
    assert [path.name for path in (tmp_path / "uploads").iterdir()] == ["main"]


def test_submit_returns_while_the_upload_runs(tmp_path, checkpoints):
    started, gate = tmp_path / "started", tmp_path / "gate"
    uploader = Uploader(GatedTarget(tmp_path / "uploads", started, gate), attempts=1)
    assert uploader.submit(checkpoints[0], "step100")
    wait_for_file(started)
    # The gate opens only below, so the upload that has begun cannot have finished when submit returned.
    assert uploader.is_pending(checkpoints[0]) and uploader.pending() == {checkpoints[0]}
    assert not (tmp_path / "uploads" / "step100").exists()
    gate.touch()
    assert uploader.close(timeout=600) == []
    assert not uploader.is_pending(checkpoints[0])
    assert contents(tmp_path / "uploads" / "step100") == contents(checkpoints[0])


def test_failed_attempts_are_retried_with_backoff_and_logged_in_the_main_process(tmp_path, checkpoints, caplog):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    uploader = Uploader(FlakyTarget(tmp_path / "uploads", attempts, failures=2), attempts=4, backoff_seconds=0.01)
    uploader.submit(checkpoints[0], "step100")
    assert uploader.close(timeout=600) == []
    assert sorted(path.name for path in attempts.iterdir()) == ["step100.1", "step100.2", "step100.3"]
    assert contents(tmp_path / "uploads" / "step100") == contents(checkpoints[0])
    warnings = [record.getMessage() for record in worker_records(caplog) if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "(attempt 1 of 4): ConnectionError: attempt 1: the network is down; retrying in 0.01 s" in warnings[0]
    assert "(attempt 2 of 4): ConnectionError: attempt 2: the network is down; retrying in 0.02 s" in warnings[1]


def test_each_retry_waits_twice_as_long_as_the_one_before(tmp_path, checkpoints):
    attempts, waits = tmp_path / "attempts", []
    attempts.mkdir()
    target = FlakyTarget(tmp_path / "uploads", attempts, failures=3)
    assert upload_with_retries(target, checkpoints[0], "step100", attempts=5, backoff_seconds=0.5,
                               sleep=waits.append) is None
    assert waits == [0.5, 1.0, 2.0] and len(list(attempts.iterdir())) == 4
    assert contents(tmp_path / "uploads" / "step100") == contents(checkpoints[0])


def test_an_upload_that_always_fails_is_reported_at_close_and_the_local_folder_stays(tmp_path, checkpoints, caplog):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    original = contents(checkpoints[0])
    uploader = Uploader(FlakyTarget(tmp_path / "uploads", attempts, failures=99), attempts=3, backoff_seconds=0.01)
    uploader.submit(checkpoints[0], "step100")
    [failure] = uploader.close(timeout=600)
    assert (failure.folder, failure.revision) == (checkpoints[0], "step100")
    assert failure.error == "ConnectionError: attempt 3: the network is down"
    assert len(list(attempts.iterdir())) == 3
    assert contents(checkpoints[0]) == original and not (tmp_path / "uploads").exists()
    [given_up] = [record for record in worker_records(caplog) if record.levelno == logging.ERROR]
    assert "failed 3 times" in given_up.getMessage() and "Traceback" in given_up.getMessage()
    [reported] = [record for record in caplog.records if "upload(s) failed; the local folders are kept" in record.msg]
    assert f"{checkpoints[0]} as step100: ConnectionError" in reported.getMessage()


def test_a_full_queue_skips_intermediate_checkpoints_but_the_final_one_waits(tmp_path, checkpoints, caplog):
    destination, gate = tmp_path / "uploads", tmp_path / "gate"
    uploader = Uploader(GatedTarget(destination, tmp_path / "started", gate), max_pending=1)
    assert uploader.submit(checkpoints[0], "step100")
    assert not uploader.submit(checkpoints[1], "step200")
    [skipped] = [record for record in caplog.records if record.getMessage().startswith("Skipping the upload of")]
    assert skipped.levelno == logging.WARNING and f"{checkpoints[1]} as step200" in skipped.getMessage()
    assert not uploader.is_pending(checkpoints[1])
    # step100's upload can finish only once submit says it waits for room, so if submit returns, it waited.
    with open_gate_when_logged(gate, "The upload queue is full; waiting for room"):
        assert uploader.submit(checkpoints[2], "main", final=True)
        assert not uploader.is_pending(checkpoints[0]) and (destination / "step100").is_dir()
    assert uploader.close(timeout=600) == []
    assert sorted(path.name for path in destination.iterdir()) == ["main", "step100"]
    assert contents(destination / "main") == contents(checkpoints[2])


def test_close_gives_a_pending_upload_its_timeout_to_finish(tmp_path, checkpoints):
    started, gate = tmp_path / "started", tmp_path / "gate"
    uploader = Uploader(GatedTarget(tmp_path / "uploads", started, gate))
    uploader.submit(checkpoints[0], "step100")
    wait_for_file(started)
    # The upload can finish only once close has begun to wait for it.
    with open_gate_when_logged(gate, "Waiting for 1 checkpoint upload(s) to finish"):
        assert uploader.close(timeout=600) == []
    assert contents(tmp_path / "uploads" / "step100") == contents(checkpoints[0])


def test_close_is_bounded_by_its_timeout(tmp_path, checkpoints, caplog):
    started = tmp_path / "started"
    uploader = Uploader(GatedTarget(tmp_path / "uploads", started, tmp_path / "never_created"), attempts=1)
    uploader.submit(checkpoints[0], "step100")
    wait_for_file(started)
    with caplog.at_level(logging.INFO):
        [failure] = uploader.close(timeout=1.0)
    # The gate never opens, so had close waited for the upload, the upload would have failed with a TimeoutError.
    assert failure.revision == "step100"
    assert failure.error == "not finished: the upload process was terminated when close timed out after 1.0 s"
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("Waiting for 1 checkpoint upload(s) to finish") for message in messages)
    assert any("terminating the upload process" in message for message in messages)
    assert checkpoints[0].exists()


def test_the_upload_process_outlives_a_sigterm_sent_by_anyone_but_its_parent(tmp_path, checkpoints, caplog):
    started, gate = tmp_path / "started", tmp_path / "gate"
    # The upload can finish only once the upload process has received the SIGTERM and said that it ignores it.
    with open_gate_when_logged(gate, "The upload process ignores the SIGTERM from process"):
        uploader = Uploader(GatedTarget(tmp_path / "uploads", started, gate))
        uploader.submit(checkpoints[0], "step100")
        wait_for_file(started)
        subprocess.run(["kill", "-TERM", str(uploader._process.pid)], check=True)  # as a launcher's killpg would
        assert uploader.close(timeout=600) == []
    assert contents(tmp_path / "uploads" / "step100") == contents(checkpoints[0])


def test_the_upload_process_ends_at_its_parents_sigterm(tmp_path, checkpoints):
    started = tmp_path / "started"
    uploader = Uploader(GatedTarget(tmp_path / "uploads", started, tmp_path / "never_created"))
    uploader.submit(checkpoints[0], "step100")
    wait_for_file(started)
    try:
        uploader._process.terminate()  # what close does when its time is up, and multiprocessing at exit
        uploader._process.join(timeout=600)
        assert uploader._process.exitcode == -signal.SIGTERM
    finally:
        uploader._process.kill()  # else a process that ignored it would hang this one's exit, in multiprocessing's join
    [failure] = uploader.close(timeout=600)
    assert failure.error == f"not finished: the upload process exited with code {-signal.SIGTERM}"


# The one fake: the Hub is unreachable from here, so huggingface_hub's HTTP client gets an in-memory transport
# (through its supported hook, set_client_factory) and the tests check the requests it would send.
@pytest.fixture
def fake_hub():
    hub = FakeHub()
    hub.install()
    yield hub
    set_client_factory(default_client_factory)


def test_the_hub_target_creates_the_repo_and_a_branch_per_checkpoint_and_uploads_the_final_one_to_main(
        fake_hub, checkpoints):
    (checkpoints[0] / "half-written.tmp").write_text("never uploaded")
    target = HubTarget("someone/tiny-gpt", token=TOKEN, private=True)
    target.upload(checkpoints[0], "step100")
    target.upload(checkpoints[0], "main")
    # Leaves out huggingface_hub's own fetch of its agent registry, which it makes at most once a day.
    uploads = [request for request in fake_hub.requests if request.url.path != "/api/agent-harnesses"]
    calls = [(request.method, request.url.path) for request in uploads]
    assert calls == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/models/someone/tiny-gpt/branch/step100"),
        ("POST", "/api/models/someone/tiny-gpt/preupload/step100"),
        ("POST", "/api/models/someone/tiny-gpt/commit/step100"),
        ("POST", "/api/repos/create"),
        ("POST", "/api/models/someone/tiny-gpt/preupload/main"),
        ("POST", "/api/models/someone/tiny-gpt/commit/main"),
    ]
    create = json.loads(uploads[0].content)
    assert create == {"name": "tiny-gpt", "organization": "someone", "visibility": "private", "type": "model"}
    assert all(request.headers["authorization"] == f"Bearer {TOKEN}" for request in uploads)
    commit = [json.loads(line) for line in uploads[3].content.splitlines()]
    assert sorted(item["value"]["path"] for item in commit if item["key"] == "file") == [
        "config.json", "model.safetensors"]


def test_the_token_appears_in_no_log_line_error_or_repr(tmp_path, checkpoints, caplog):
    target = RejectedHubTarget("someone/tiny-gpt", token=TOKEN)
    assert TOKEN not in repr(target)
    with caplog.at_level(logging.DEBUG):  # the worker logs everything, huggingface_hub's debug lines included
        uploader = Uploader(target, attempts=2, backoff_seconds=0.01)
        uploader.submit(checkpoints[0], "step100")
        [failure] = uploader.close(timeout=600)
    assert f"Invalid credentials: Bearer {REDACTED}" in failure.error
    problems = [record.getMessage() for record in worker_records(caplog) if record.levelno >= logging.WARNING]
    assert len(problems) == 2 and all(f"Bearer {REDACTED}" in problem for problem in problems)
    assert TOKEN not in caplog.text and TOKEN not in failure.error


def test_upload_target_is_the_hub_or_a_folder(tmp_path):
    hub = upload_target("hub", "someone/tiny-gpt", hub_token=TOKEN, hub_private=True)
    assert isinstance(hub, HubTarget) and (hub.repo_id, hub.token, hub.private) == ("someone/tiny-gpt", TOKEN, True)
    assert isinstance(upload_target(None, "someone/tiny-gpt"), HubTarget)
    local = upload_target(str(tmp_path), "someone/tiny-gpt")
    assert isinstance(local, LocalTarget) and local.destination == tmp_path
    with pytest.raises(ValueError, match="--hub_model_id"):
        upload_target("hub", None)


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="uploads to the real Hub only when HF_TOKEN is set")
def test_uploads_to_the_real_hub(checkpoints):
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/timl-upload-test-{uuid.uuid4().hex[:8]}"
    try:
        with Uploader(HubTarget(repo_id, private=True), backoff_seconds=1.0) as uploader:
            uploader.submit(checkpoints[0], "step100")
            uploader.submit(checkpoints[0], "main", final=True)
            assert uploader.close(timeout=600) == []
        assert {"main", "step100"} <= {branch.name for branch in api.list_repo_refs(repo_id).branches}
        for revision in ("main", "step100"):
            assert {"config.json", "model.safetensors"} <= set(api.list_repo_files(repo_id, revision=revision))
    finally:
        api.delete_repo(repo_id, missing_ok=True)

"""Stop signals: the first asks for a save, a second exits at once, and under torchrun a SIGTERM leaves the upload
process running until the trainer's grace period for uploads is over.

Every step is sequenced by files that the processes create when something has happened, never by sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from upload_targets import wait_for_file

from timl.train.preemption import PreemptionGuard

WORKERS = Path(__file__).resolve().parents[1] / "workers"
ROOT = WORKERS.parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}

# A training loop that never ends by itself: it says when it is ready and when the guard has seen a stop signal.
# Its third argument sets the window in which a repeated signal counts as the launcher's copy of the first.
ENDLESS_STEPS = """
import sys, time
from pathlib import Path
from timl.train import preemption
from timl.train.preemption import PreemptionGuard

ready, requested = Path(sys.argv[1]), Path(sys.argv[2])
preemption.DUPLICATE_SECONDS = float(sys.argv[3])
with PreemptionGuard() as guard:
    ready.touch()
    while True:
        if guard.requested:
            requested.touch()
        time.sleep(0.01)
"""


def test_the_first_signal_is_a_request_and_the_previous_handlers_come_back():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.requested
        signal.raise_signal(signal.SIGINT)
        assert guard.requested and guard.received == signal.SIGINT
    assert {signum: signal.getsignal(signum) for signum in before} == before


def endless_steps_after_a_sigterm(tmp_path: Path, duplicate_seconds: str) -> subprocess.Popen:
    """ENDLESS_STEPS with that window for copies, once it has taken a first SIGTERM as a request and goes on."""
    ready, requested = tmp_path / "ready", tmp_path / "requested"
    process = subprocess.Popen([sys.executable, "-c", ENDLESS_STEPS, str(ready), str(requested), duplicate_seconds],
                               env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for_file(ready, process)
    process.send_signal(signal.SIGTERM)
    wait_for_file(requested, process)
    return process


def test_a_second_sigterm_exits_at_once_by_the_signal(tmp_path):
    """With no window for copies, so that the second signal is a second request however soon it comes."""
    process = endless_steps_after_a_sigterm(tmp_path, "0")
    try:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGTERM
    assert "Received SIGTERM: finishing this step" in stderr and "Second SIGTERM: exiting at once" in stderr


def test_the_launchers_copy_of_the_same_signal_is_not_a_second_request(tmp_path):
    """SLURM signals a job step's every process and torchrun forwards the same signal to its workers: a repeat
    within the window is one stop, and the run goes on to save."""
    process = endless_steps_after_a_sigterm(tmp_path, "3600")
    try:
        process.send_signal(signal.SIGTERM)
        said = []
        for line in process.stderr:  # until the guard says what it made of the copy, or the process ends
            said.append(line)
            if "copy of the same stop" in line:
                break
        assert process.poll() is None, "".join(said)  # still running: it goes on to save
    finally:
        process.kill()
        process.communicate(timeout=600)
    assert said[-1].startswith("SIGTERM again within 3600 s: taken as the launcher's copy of the same stop")
    assert not any("Second" in line for line in said)


def test_under_torchrun_a_sigterm_lets_the_upload_finish_in_its_grace_period_and_the_workers_exit(tmp_path):
    checkpoint = tmp_path / "step1"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(os.urandom(100_000))
    log = tmp_path / "torchrun.log"
    with open(log, "w") as output:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(WORKERS / "preempted_workers.py"), str(tmp_path), "60"],
            env=ENV, start_new_session=True, stdout=output, stderr=subprocess.STDOUT)
    try:
        for name in ("rank0.ready", "rank1.ready", "upload_started"):
            wait_for_file(tmp_path / name, launcher)
        # As a scheduler stops the launcher: torchrun then sends SIGTERM to each worker's process group, which
        # holds the upload process too, and SIGKILL to the groups still alive 30 s later.
        os.killpg(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    output = log.read_text()
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Rank 0's upload process ended when the uploader closed it through its queue, after the upload.
    rank0 = {"signal": "SIGTERM", "failures": [], "upload_process_exitcode": 0}
    assert results == [rank0, {"signal": "SIGTERM"}], output
    assert (tmp_path / "uploads" / "step1" / "model.safetensors").read_bytes() == (
        checkpoint / "model.safetensors").read_bytes()
    assert "rank 0: timl.checkpoint.upload: The upload process ignores the SIGTERM from process" in output
    assert "forcefully exiting" not in output, output  # every worker had exited before torchrun's SIGKILL

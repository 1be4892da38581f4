"""examples/slurm/train.sbatch against a real SLURM: munged, slurmctld and slurmd started on this machine, one node
with its CPUs, and the job script submitted with its CPU switch (two processes over gloo). A job that is requeued
mid-run saves, waits in the queue, and resumes to the losses of a job that ran through; one killed in the middle of a
save resumes from the checkpoint before; two launchers meet at the script's rendezvous; the README's command is one
that SLURM and timl accept.

SLURM comes from Debian's slurm-wlm and munge packages, which .ci/run installs. Where they are missing the tests
skip and say how to install them, except under TIML_REQUIRE_SLURM=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from test_documented_flags import SLURM_FLAGS
from timl.config import ModelArguments, TrainingArguments, parse_args

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "slurm" / "train.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
MISSING = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
if (MISSING or os.geteuid() != 0) and os.environ.get("TIML_REQUIRE_SLURM") != "1":
    pytest.skip(f"a local SLURM needs root and Debian's slurm-wlm and munge packages (missing: "
                f"{', '.join(MISSING) or 'none'}; root: {os.geteuid() == 0}): `apt-get install slurm-wlm munge` as "
                f"root, as .ci/run does", allow_module_level=True)

JOB_SECONDS = 900  # a job's whole life may take this long on a loaded machine; it takes about a minute
STEPS = 600  # long enough that a requeue sent at step 30 lands mid-run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """A one-node SLURM cluster on localhost, its key, config, state and logs in `folder` (a short path: munge's
    socket lives there). The daemons run in the foreground, each in its own process group, and `stop` ends them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.daemons: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def start(self) -> None:
        folder = self.folder
        for name in ("state", "spool", "munge"):
            (folder / name).mkdir(mode=0o700)
        (folder / "munge").chmod(0o755)  # clients need to reach the socket
        subprocess.run([sbin("mungekey"), "--create", f"--keyfile={folder / 'munge.key'}"], check=True,
                       capture_output=True)
        socket_path = folder / "munge" / "socket"
        self.spawn("munged", [sbin("munged"), "--foreground", "--force", f"--socket={socket_path}",
                              f"--key-file={folder / 'munge.key'}", f"--log-file={folder / 'munged.log'}",
                              f"--pid-file={folder / 'munge' / 'pid'}", f"--seed-file={folder / 'munge' / 'seed'}"])
        self.wait_until(socket_path.exists, "munged's socket")
        host = socket.gethostname().split(".")[0]
        # The node as slurmd sees this machine (CPUs, sockets, memory), so that it registers without a mismatch.
        node = subprocess.run([sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        node = re.search(r"^NodeName=.*$", node, re.M).group(0)
        node = re.sub(r"RealMemory=\d+", "", node).strip()
        (folder / "slurm.conf").write_text("\n".join([
            "ClusterName=timl", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={socket_path}", "CredType=cred/munge",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}", f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}", f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "MpiDefault=none", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2", "KillWait=5", "MinJobAge=3600",
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        self.spawn("slurmctld", [sbin("slurmctld"), "-D", "-i"])
        self.spawn("slurmd", [sbin("slurmd"), "-D"])
        self.wait_until(lambda: self.command("sinfo", "-h", "-o", "%T", check=False).strip() == "idle",
                        "the node to be idle")

    def spawn(self, name: str, command: list[str]) -> None:
        log = open(self.folder / f"{name}.out", "w")
        self.daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True))

    def wait_until(self, ready, what: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            for daemon in self.daemons:
                assert daemon.poll() is None, f"{daemon.args[0]} exited waiting for {what}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"no {what} after {seconds} s:\n{self.logs()}"
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
                         for path in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")))

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()

    def command(self, *words: str, check: bool = True, **kwargs) -> str:
        result = subprocess.run(words, env={**self.env, **kwargs.pop("env", {})}, capture_output=True, text=True,
                                timeout=600, **kwargs)
        assert not check or result.returncode == 0, f"{shlex.join(words)}: {result.stderr}"
        return result.stdout

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`'s fields."""
        text = self.command("scontrol", "show", "job", "-o", str(job_id))
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def wait_for_state(self, job_id: int, states: set[str]) -> str:
        deadline = time.monotonic() + JOB_SECONDS
        while (state := self.job(job_id)["JobState"]) not in states:
            assert time.monotonic() < deadline, f"job {job_id} still {state} after {JOB_SECONDS} s:\n{self.logs()}"
            time.sleep(0.2)
        return state

    def requeue_and_release(self, job_id: int) -> None:
        """`scontrol requeue`, as a preemption: the job is signalled, ends and goes back in the queue, where SLURM
        holds a requeued job for a while; the release lets it start at once."""
        self.command("scontrol", "requeue", str(job_id))
        self.wait_for_state(job_id, {"PENDING"})
        self.command("scontrol", "update", f"jobid={job_id}", "StartTime=now")


@pytest.fixture(scope="module")
def slurm():
    folder = Path(tempfile.mkdtemp(prefix="timl-slurm-"))
    cluster = LocalSlurm(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm_data")
    write_learnable_shards(folder, 200_000, "train")
    return folder


def timl_args(data: Path, output_dir: Path) -> list[str]:
    return ["--model_name", "gpt2", "--config_overrides", TINY_GPT2, "--output_dir", str(output_dir),
            "--train_file_pattern", str(data / "train_*.bin"), "--block_size", "16", "--train_batch_size", "8",
            "--per_device_train_batch_size", "4", "--max_train_steps", str(STEPS), "--save_every_steps", "100",
            "--log_every_steps", "1", "--eval_every_steps", "0", "--report_to", "none", "--optim", "adamw_torch"]


def submit(slurm: LocalSlurm, folder: Path, *args: str, sbatch: tuple[str, ...] = (), launchers: int = 1,
           processes: int = 2, **env: str) -> int:
    """Submits the job script from `folder` (where its log goes) on the CPU: `launchers` tasks on the node, each
    with `processes` processes."""
    folder.mkdir(parents=True, exist_ok=True)
    job_env = {"CPU_PROCESSES_PER_NODE": str(processes), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]), **env}
    output = slurm.command("sbatch", "--parsable", "--gpus-per-node=0", f"--ntasks-per-node={launchers}",
                           f"--cpus-per-task={max(1, 2 // launchers)}", *sbatch, str(SCRIPT), *args, cwd=folder,
                           env=job_env)
    return int(output.strip().split(";")[0])


def log_of(folder: Path, job_id: int) -> str:
    return (folder / f"timl-{job_id}.log").read_text(errors="replace")


def train_losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["train_loss"] for record in read_metrics(output_dir) if "train_loss" in record}


def finish(slurm: LocalSlurm, folder: Path, job_id: int) -> str:
    state = slurm.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"})
    log = log_of(folder, job_id)
    assert state == "COMPLETED", f"job {job_id}: {state}\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def reference(slurm, data, tmp_path_factory) -> dict[int, float]:
    """The losses of the job run through, uninterrupted."""
    folder = tmp_path_factory.mktemp("reference")
    job = submit(slurm, folder, *timl_args(data, folder / "run"))
    log = finish(slurm, folder, job)
    assert "2 process(es)" in log and "start 1," in log
    losses = train_losses(folder / "run")
    assert list(losses) == list(range(1, STEPS + 1))
    return losses


def logged_step(output_dir: Path) -> int:
    """The newest step in metrics.jsonl while the job writes it (0 before it exists; a line cut short is skipped)."""
    path, step = output_dir / "metrics.jsonl", 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            step = max(step, json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return step


def wait_for_step(output_dir: Path, step: int, slurm: LocalSlurm, job_id: int) -> None:
    deadline = time.monotonic() + JOB_SECONDS
    while logged_step(output_dir) < step:
        assert slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job_id)
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.1)


def test_a_requeued_job_saves_waits_and_resumes_to_the_uninterrupted_losses(slurm, data, reference, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, *timl_args(data, run))
    wait_for_step(run, 30, slurm, job)
    slurm.requeue_and_release(job)
    log = finish(slurm, tmp_path, job)
    assert slurm.job(job)["Restarts"] == "1"
    stopped = int(re.search(r"Stopped by SIGTERM after step (\d+): saving", log).group(1))
    assert 30 <= stopped < STEPS and (run / f"step{stopped}" / "trainer_state.json").is_file()
    assert f"Resumed from {run / f'step{stopped}'} at step {stopped}." in log
    assert "start 2," in log and "Second SIGTERM" not in log
    losses = train_losses(run)
    assert list(losses) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(reference, rel=1e-5)


def test_a_job_killed_in_the_middle_of_a_save_resumes_from_the_checkpoint_before(slurm, data, reference, tmp_path):
    """The job's processes pause in the save of step 200, once its DCP shards are written and before its marker;
    the requeue's SIGTERM cannot end them, SIGKILL does after KillWait, and the requeued job resumes from step100."""
    run = tmp_path / "run"
    worker = ROOT / "tests" / "workers" / "dcp_worker.py"
    job = submit(slurm, tmp_path, *timl_args(data, run), TIML_ENTRY=f"{worker} pause", TIML_PAUSE_AT_STEP="200")
    deadline = time.monotonic() + JOB_SECONDS
    while not (run / "paused").exists():
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(0.1)
    slurm.requeue_and_release(job)
    log = finish(slurm, tmp_path, job)
    assert f"Resumed from {run / 'step100'} at step 100." in log
    losses = train_losses(run)
    assert list(losses)[-1] == STEPS
    assert losses == pytest.approx(reference, rel=1e-5)
    assert (run / "step200" / "trainer_state.json").is_file()  # saved again, whole, by the second run


def test_two_launchers_meet_at_the_scripts_rendezvous(slurm, data, reference, tmp_path):
    """Two tasks on the node stand for two nodes: each runs torchrun with one process, --nnodes from SLURM_NTASKS,
    and the c10d rendezvous on the job's first node makes them one world of two, which trains as the reference's
    two processes do."""
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, *timl_args(data, run), launchers=2, processes=1)
    log = finish(slurm, tmp_path, job)
    assert "2 launcher(s) of 1 process(es)" in log
    assert json.loads((run / f"step{STEPS}" / "trainer_state.json").read_text())["world_size"] == 2
    assert train_losses(run) == pytest.approx(reference, rel=1e-5)


def test_the_readmes_slurm_command_is_one_that_slurm_and_timl_accept(slurm, tmp_path):
    section = re.search(r"## Running on SLURM\n(.*?)\n## ", (ROOT / "README.md").read_text(), re.S).group(1)
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    command = shlex.split(next(line for line in block.replace("\\\n", " ").splitlines()
                               if line.startswith("sbatch ")), comments=True)
    script_at = next(index for index, word in enumerate(command) if word.endswith(".sbatch"))
    assert (ROOT / command[script_at]).resolve() == SCRIPT
    # SLURM checks the script and its options without running it; this node has neither the GPUs nor the CPUs of
    # the script's defaults, so none are asked for.
    slurm.command(*command[:script_at], "--test-only", "--gpus-per-node=0", "--cpus-per-task=1", str(SCRIPT),
                  cwd=tmp_path)
    parse_args(ModelArguments, TrainingArguments, argv=command[script_at + 1:])


def test_the_slurm_options_the_docs_name_are_slurms(slurm):
    helps = slurm.command("sbatch", "--help") + slurm.command("squeue", "--help")
    assert not [flag for flag in SLURM_FLAGS if not re.search(rf"{re.escape(flag)}\b", helps)]

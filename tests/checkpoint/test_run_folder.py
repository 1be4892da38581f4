"""One run per folder: a fresh run refuses another run's folder before any work, --overwrite_output_dir clears it,
resuming continues it, and two live runs never write one folder (a real second process holds the lock)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.checkpoint import manager as checkpoint
from timl.config import ModelArguments, TrainingArguments
from timl.train.pretrain import pretrain
from timl.checkpoint.run_folder import LOCK_FILE, RunFolderError, RunLock

ROOT = Path(__file__).resolve().parents[2]


def args(data_dir: Path, output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), train_file_pattern=str(data_dir / "train_*.bin"), block_size=16,
                  train_batch_size=4, per_device_train_batch_size=4, max_train_steps=4, log_every_steps=1,
                  eval_every_steps=0, save_every_steps=2, report_to="none", optim="adamw_torch")
    return TrainingArguments(**{**values, **overrides})


@pytest.fixture
def finished_run(tmp_path):
    """A folder holding a whole earlier run: step2/, step4/, main/ and its metrics, trained with seed 0."""
    write_learnable_shards(tmp_path, 4096, "train")
    output_dir = tmp_path / "run"
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args(tmp_path, output_dir))
    return tmp_path, output_dir


def test_a_fresh_run_into_another_runs_folder_is_refused_before_any_work(finished_run):
    data_dir, output_dir = finished_run
    before = {path: path.stat().st_mtime_ns for path in output_dir.rglob("*")}
    with pytest.raises(ValueError) as error:
        pretrain(ModelArguments(config_overrides=TINY_GPT2), args(data_dir, output_dir, seed=1))
    message = str(error.value)
    assert f"--output_dir {output_dir} holds another run" in message
    assert "main, metrics.jsonl, step2, step4" in message
    for way in ("--resume_from_checkpoint latest", "a new --output_dir", "--overwrite_output_dir true"):
        assert way in message
    assert {path: path.stat().st_mtime_ns for path in output_dir.rglob("*")} == before


def test_overwrite_output_dir_deletes_the_previous_run_and_latest_then_resumes_the_new_one(finished_run):
    data_dir, output_dir = finished_run
    (output_dir / "notes.txt").write_text("mine")  # not the run's: stays
    pretrain(ModelArguments(config_overrides=TINY_GPT2),
             args(data_dir, output_dir, seed=1, max_train_steps=3, save_every_steps=3, overwrite_output_dir=True))
    assert sorted(path.name for path in output_dir.iterdir() if not path.name.startswith(".")) == [
        "main", "metrics.jsonl", "notes.txt", "run_config.json", "step3"]
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3]  # nothing of the old run's lines
    latest = checkpoint.resolve("latest", output_dir)
    assert latest == output_dir / "step3"
    assert checkpoint.read_trainer_state(latest)["args"]["seed"] == 1


def test_resuming_a_finished_run_is_not_refused(finished_run, capsys):
    data_dir, output_dir = finished_run
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args(data_dir, output_dir, resume_from_checkpoint="latest"))
    assert "already finished at step 4" in capsys.readouterr().out


def test_a_fresh_start_from_latest_with_no_checkpoint_keeps_no_line_of_an_earlier_attempt(tmp_path):
    """A job that crashed before its first checkpoint, requeued with --resume_from_checkpoint latest."""
    write_learnable_shards(tmp_path, 4096, "train")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 9.0}) + "\n")
    pretrain(ModelArguments(config_overrides=TINY_GPT2),
             args(tmp_path, output_dir, resume_from_checkpoint="latest", max_train_steps=2))
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2]
    assert read_metrics(output_dir)[0]["train_loss"] != 9.0


def test_the_run_config_records_how_the_model_was_made(tmp_path):
    write_learnable_shards(tmp_path, 4096, "train")
    output_dir = tmp_path / "run"
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args(tmp_path, output_dir, max_train_steps=2))
    model = json.loads((output_dir / "run_config.json").read_text())["model"]
    assert model["model_name"] == "gpt2" and model["config_overrides"] == TINY_GPT2
    assert model["from_pretrained"] is None
    assert checkpoint.read_trainer_state(output_dir / "step2")["model"] == model

    # Continued pre-training names the weights it started from.
    continued = tmp_path / "continued"
    pretrain(ModelArguments(from_pretrained=str(output_dir / "main")), args(tmp_path, continued, max_train_steps=2))
    model = json.loads((continued / "run_config.json").read_text())["model"]
    assert model["from_pretrained"] == str(output_dir / "main")
    assert "from_pretrained_commit" in model


HOLDER = """
import sys, time
from timl.checkpoint.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(output_dir: Path) -> subprocess.Popen:
    """A real second process that holds output_dir's lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_live_run_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    write_learnable_shards(tmp_path, 4096, "train")
    output_dir = tmp_path / "run"
    holder = hold_lock(output_dir)
    try:
        with pytest.raises(RunFolderError) as error:
            pretrain(ModelArguments(config_overrides=TINY_GPT2), args(tmp_path, output_dir))
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(error.value)
        assert "in use by another live run" in str(error.value)
        assert not (output_dir / "metrics.jsonl").exists() and not list(output_dir.glob("step*"))
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the lock, the file still names it
        holder.wait()
    assert str(holder.pid) in (output_dir / LOCK_FILE).read_text()
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args(tmp_path, output_dir, max_train_steps=2))
    assert f"names pid {holder.pid}" in caplog.text and "taking it over" in caplog.text
    assert (output_dir / "step2").is_dir()
    assert (output_dir / LOCK_FILE).read_text() == ""  # released at the end: names nobody
    RunLock(output_dir).acquire()  # and free


def test_with_two_processes_a_held_folder_stops_both_ranks_with_one_message(tmp_path):
    write_learnable_shards(tmp_path, 4096, "train")
    output_dir = tmp_path / "run"
    holder = hold_lock(output_dir)
    try:
        argv = ["--config_overrides", TINY_GPT2, "--output_dir", str(output_dir), "--train_file_pattern",
                str(tmp_path / "train_*.bin"), "--block_size", "16", "--train_batch_size", "4",
                "--per_device_train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none"]
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(ROOT / "recipes" / "gpt2_c4.py"), *argv], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                                                 "ACCELERATE_USE_CPU": "true"})
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    assert done.stderr.count("in use by another live run") == 1, done.stderr[-3000:]  # rank 0's, printed once
    assert not (output_dir / "metrics.jsonl").exists()

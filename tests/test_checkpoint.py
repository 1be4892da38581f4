"""Checkpoints: exact resume after kill -9 (one and two processes), atomic saves, keep-last-N, SIGTERM, safety."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl import checkpoint
from timl.arguments import TrainingArguments
from timl.recipe import ModelArguments, pretrain

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data(tmp_path):
    write_learnable_shards(tmp_path, 60_000, "train", seed=0)
    write_learnable_shards(tmp_path, 640, "validation", seed=1)
    return tmp_path


def argv(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    # Dropout is on (GPT-2's default 0.1), so an exact resume also needs every rank's RNG restored.
    return ["--model_name", "gpt2", "--config_overrides", "n_layer=2,n_embd=32,n_head=2,vocab_size=64,n_positions=64",
            "--output_dir", str(output_dir), "--train_file_pattern", str(data_dir / "train_*.bin"),
            "--eval_file_pattern", str(data_dir / "validation_*.bin"), "--block_size", "16", "--train_batch_size", "8",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--max_train_steps", "150",
            "--log_every_steps", "1", "--eval_every_steps", "25", "--save_every_steps", "10", "--report_to", "none",
            "--optim", "adamw_torch", "--learning_rate", "3e-3", "--warmup_steps", "5", *extra]


def launch(args: list[str], processes: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.Popen([*launcher, str(ROOT / "recipes" / "gpt2_c4.py"), *args], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        path = output_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never came")


def kill_all(process: subprocess.Popen, signum: int) -> None:
    """Signals the launcher and every worker at once (torchrun's workers live in sessions of their own)."""
    family = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    for member in family:
        member.send_signal(signum)
    psutil.wait_procs(family, timeout=60)
    process.communicate()


def train_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(output_dir) if "train_loss" in r}


@pytest.mark.parametrize(("processes", "optim"), [(1, "adamw_torch"), (2, "adamw_torch"), (1, "muon")])
def test_kill_9_then_resume_from_latest_gives_the_same_losses_to_the_bit(data, processes, optim):
    finish(launch(argv(data, data / "reference", "--optim", optim), processes))
    interrupted = launch(argv(data, data / "resumed", "--optim", optim), processes)
    wait_for_step(data / "resumed", 37, interrupted)
    kill_all(interrupted, signal.SIGKILL)
    killed_at = max(train_losses(data / "resumed"))
    assert killed_at < 150
    finish(launch(argv(data, data / "resumed", "--optim", optim, "--resume_from_checkpoint", "latest"), processes))

    reference, resumed = train_losses(data / "reference"), train_losses(data / "resumed")
    assert list(resumed) == list(range(1, 151))  # lines after the last checkpoint were dropped and written again
    assert resumed == reference
    evals = lambda d: [(r["step"], r["eval_loss"]) for r in read_metrics(d) if "eval_loss" in r]
    assert evals(data / "resumed") == evals(data / "reference")


def test_sigterm_saves_at_the_step_and_exits_cleanly_then_resumes(data):
    process = launch(argv(data, data / "run"))
    wait_for_step(data / "run", 23, process)
    process.send_signal(signal.SIGTERM)
    stderr = finish(process)
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stderr
    stopped = max(train_losses(data / "run"))
    assert stopped < 150 and checkpoint.is_complete(data / "run" / f"step{stopped}")
    assert checkpoint.resolve("latest", data / "run") == data / "run" / f"step{stopped}"
    finish(launch(argv(data, data / "run", "--resume_from_checkpoint", "latest")))
    assert list(train_losses(data / "run")) == list(range(1, 151))


def tiny_args(data_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(data_dir / "run"), train_file_pattern=str(data_dir / "train_*.bin"), block_size=16,
                  train_batch_size=8, per_device_train_batch_size=4, max_train_steps=8, save_every_steps=2,
                  eval_every_steps=0, log_every_steps=1, report_to="none", optim="adamw_torch")
    return TrainingArguments(**{**values, **overrides})


def test_a_crash_between_the_files_of_a_save_leaves_latest_on_the_previous_checkpoint(data, monkeypatch):
    real_save = torch.save

    def crash_on_the_third_scheduler(obj, path, *args, **kwargs):
        if str(path).endswith("scheduler_0.pt") and ".step6.tmp" in str(path):
            raise OSError("simulated crash mid-save")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_the_third_scheduler)
    with pytest.raises(OSError, match="simulated crash"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data))
    run = data / "run"
    assert (run / ".step6.tmp" / "optimizer_0.pt").exists()  # half written, under a hidden name
    assert checkpoint.resolve("latest", run) == run / "step4"
    # A step folder missing a file (copied by hand, say) is skipped too.
    (run / "step4" / "optimizer_0.pt").unlink()
    assert checkpoint.resolve("latest", run) == run / "step2"


def test_keep_last_n_keeps_the_newest_and_main(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, save_total_limit=2))
    names = sorted(p.name for p in (data / "run").iterdir() if p.is_dir())
    assert names == ["main", "step6", "step8"]


def test_resume_with_another_block_size_says_what_differs(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2))
    with pytest.raises(checkpoint.CheckpointError, match="block_size: checkpoint 16, now 8"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, block_size=8, resume_from_checkpoint=str(data / "run" / "step2")))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_never_unpickles_arbitrary_objects(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2))
    with open(data / "run" / "step2" / "optimizer_0.pt", "wb") as file:
        pickle.dump(Payload(), file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, max_train_steps=4, resume_from_checkpoint="latest"))


def test_a_checkpoint_holds_everything_and_loads_with_from_pretrained(data):
    from transformers import AutoModelForCausalLM

    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2, hub_token="hf_SECRET"))
    folder = data / "run" / "step2"
    assert {"model.safetensors", "config.json", "optimizer_0.pt", "scheduler_0.pt", "rng_state_0.pt",
            "loader_state_0.json", "trainer_state.json"} <= {p.name for p in folder.iterdir()}
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["tokens"] == 2 * 8 * 16 and state["world_size"] == 1
    assert state["args"]["hub_token"] == "<redacted>" and state["provenance"]["versions"]["torch"]
    assert json.loads((folder / "loader_state_0.json").read_text())["position"] == 2 * 8 * 16
    AutoModelForCausalLM.from_pretrained(folder)


def test_uploads_reach_a_local_target_and_the_token_is_never_written_or_printed(data):
    token = "hf_TOPSECRETtoken123456"
    uploads = data / "uploads"
    process = launch(argv(data, data / "run", "--max_train_steps", "20", "--push_to_hub", "true", "--hub_target",
                          str(uploads), "--hub_model_id", "someone/tiny", "--hub_token", token))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert token not in stdout and token not in stderr
    for path in [*(data / "run").rglob("*"), *uploads.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert (uploads / "main" / "model.safetensors").read_bytes() == \
        (data / "run" / "main" / "model.safetensors").read_bytes()
    assert checkpoint.is_complete(uploads / "step20")


def test_a_resumed_run_continues_the_same_wandb_run(data, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(data))  # no login: W&B runs offline
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2, report_to="wandb"))
    run_id = json.loads((data / "run" / "step2" / "trainer_state.json").read_text())["tracker_run_ids"]["wandb"]
    pretrain(ModelArguments(config_overrides=TINY_GPT2),
             tiny_args(data, max_train_steps=4, report_to="wandb", resume_from_checkpoint="latest"))
    # Two runs in the same second share a folder name, so count run ids, not folders.
    runs = list((data / "run" / "wandb").glob("offline-run-*"))
    assert runs and {path.name.rsplit("-", 1)[1] for path in runs} == {run_id}
    assert (data / "run" / "wandb" / "latest-run").resolve().name.endswith(f"-{run_id}")

"""Checkpoints: exact resume after kill -9 (one and two processes), atomic saves, keep-last-N, SIGTERM, rollbacks,
safety, verification on resume (truncated, altered, unverifiable), failed saves on a full disk or on one rank."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.checkpoint import manager as checkpoint
from timl.config import ModelArguments, TrainingArguments
from timl.train.callbacks import TrainerCallback
from timl.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[2]


STEPS = 80  # a SIGTERM at step 5 or 23, and a kill -9 at step 37: past a checkpoint and well before the end


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
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--max_train_steps", str(STEPS),
            "--log_every_steps", "1", "--eval_every_steps", "25", "--save_every_steps", "10", "--report_to", "none",
            "--optim", "adamw_torch", "--learning_rate", "3e-3", "--warmup_steps", "5", *extra]


def launch(args: list[str], processes: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.Popen([*launcher, str(ROOT / "recipes" / "gpt2_c4.py"), *args], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 600) -> None:
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
    psutil.wait_procs(family, timeout=600)
    process.communicate()


def train_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(output_dir) if "train_loss" in r}


def resume_through_a_kill_9(data_dir: Path, run: Path, processes: int, *extra: str) -> None:
    """Resumes the run from latest, kills it with kill -9 past its checkpoint at step 30, and resumes it to the end."""
    interrupted = launch(argv(data_dir, run, *extra, "--resume_from_checkpoint", "latest"), processes)
    wait_for_step(run, 37, interrupted)
    kill_all(interrupted, signal.SIGKILL)
    assert max(train_losses(run)) < STEPS
    finish(launch(argv(data_dir, run, *extra, "--resume_from_checkpoint", "latest"), processes))


def assert_same_losses_to_the_bit(run: Path, reference: Path) -> None:
    assert list(train_losses(run)) == list(range(1, STEPS + 1))  # lines after the last checkpoint were written again
    assert train_losses(run) == train_losses(reference)
    evals = lambda d: [(r["step"], r["eval_loss"]) for r in read_metrics(d) if "eval_loss" in r]
    assert evals(run) == evals(reference)


def test_sigterm_then_kill_9_and_resumes_from_latest_give_the_same_losses_to_the_bit(data):
    """One process, with Muon (and AdamW for the rest). SIGTERM finishes the step, saves there and exits 0 with the
    command to continue; the continued run is killed with kill -9 and resumed again."""
    run = data / "run"
    finish(launch(argv(data, data / "reference", "--optim", "muon")))
    process = launch(argv(data, run, "--optim", "muon"))
    wait_for_step(run, 23, process)
    process.send_signal(signal.SIGTERM)
    stderr = finish(process)
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stderr
    stopped = max(train_losses(run))
    assert stopped < STEPS and checkpoint.is_complete(run / f"step{stopped}")
    assert checkpoint.resolve("latest", run) == run / f"step{stopped}"
    resume_through_a_kill_9(data, run, 1, "--optim", "muon")
    assert_same_losses_to_the_bit(run, data / "reference")


def test_a_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_kill_9_resumes_to_the_bit(data):
    """Each process reads the all-reduced stop votes a step late (no host sync per step), and still all stop at once.
    The continued run is killed with kill -9 and resumed again. The ranks draw different dropout masks, so a rank
    that restored another's generators would diverge."""
    run = data / "run"
    finish(launch(argv(data, data / "reference"), processes=2))
    states = [torch.load(data / "reference" / "step10" / f"rng_state_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    process = launch(argv(data, run), processes=2)
    wait_for_step(run, 5, process)
    workers = [child for child in psutil.Process(process.pid).children(recursive=True)
               if child.environ().get("RANK") == "1" and "gpt2_c4.py" in " ".join(child.cmdline())]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGTERM)
    stderr = finish(process)
    assert "Received SIGTERM" in stderr and "Stopped by a stop signal from another process" in stderr
    stopped = max(train_losses(run))
    assert stopped < STEPS and checkpoint.is_complete(run / f"step{stopped}")
    folder = run / f"step{stopped}"
    assert (folder / "__1_0.distcp").exists()
    assert (folder / "loader_state_0.json").read_text() == (folder / "loader_state_1.json").read_text()
    resume_through_a_kill_9(data, run, 2)
    assert_same_losses_to_the_bit(run, data / "reference")


def tiny_args(data_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(data_dir / "run"), train_file_pattern=str(data_dir / "train_*.bin"), block_size=16,
                  train_batch_size=8, per_device_train_batch_size=4, max_train_steps=8, save_every_steps=2,
                  eval_every_steps=0, log_every_steps=1, report_to="none", optim="adamw_torch")
    return TrainingArguments(**{**values, **overrides})


def tiny_recipe(data_dir: Path, output_dir: Path, max_train_steps: int = 8) -> list[str]:
    """tiny_args as command-line arguments of the recipe (or of dcp_worker's modes that run pretrain)."""
    return ["--model_name", "gpt2", "--config_overrides", TINY_GPT2, "--output_dir", str(output_dir),
            "--train_file_pattern", str(data_dir / "train_*.bin"), "--block_size", "16", "--train_batch_size", "8",
            "--per_device_train_batch_size", "4", "--max_train_steps", str(max_train_steps), "--save_every_steps", "2",
            "--eval_every_steps", "0", "--report_to", "none", "--optim", "adamw_torch"]


WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
              "ACCELERATE_USE_CPU": "true"}


def test_a_kill_9_in_the_middle_of_a_save_leaves_latest_on_the_previous_checkpoint(data):
    run = data / "run"
    # The worker pauses in the save of step 6 once the DCP shards are written, before the other files.
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "workers" / "dcp_worker.py"), "pause",
                                *tiny_recipe(data, run)], env=WORKER_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (run / "paused").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.kill()
    process.communicate()
    half = {path.name for path in (run / ".step6.tmp").iterdir()}
    assert {".metadata", "__0_0.distcp", "non_tensor_state.json"} <= half and "trainer_state.json" not in half
    assert not (run / "step6").exists()
    assert checkpoint.resolve("latest", run) == run / "step4"
    # A step folder without its marker (copied by hand, say) is skipped too.
    (run / "step4" / "trainer_state.json").unlink()
    assert checkpoint.resolve("latest", run) == run / "step2"
    with pytest.raises(checkpoint.CheckpointError, match="step4 is not a complete timl checkpoint: missing "
                                                         "trainer_state.json"):
        checkpoint.resolve(str(run / "step4"), run)


def test_keep_last_n_keeps_the_newest_and_main(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, save_total_limit=2))
    names = sorted(p.name for p in (data / "run").iterdir() if p.is_dir())
    assert names == ["main", "step6", "step8"]


def test_latest_and_keep_last_n_go_by_step_number_not_by_folder_name(data):
    """Saves at steps 3, 6, 9 and 12, whose folder names differ in width: by name step12 sorts before step3, so
    keep-last-2 would keep step6 beside step9 and step12, and latest would pick step9."""
    run = data / "run"
    pretrain(ModelArguments(config_overrides=TINY_GPT2),
             tiny_args(data, max_train_steps=12, save_every_steps=3, save_total_limit=2))
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["main", "step12", "step9"]
    assert checkpoint.resolve("latest", run) == run / "step12"


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.step == self.step


def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(data, caplog):
    run = data / "run"
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data))  # step2, step4, step6, step8
    old_step8 = (run / "step8" / "__0_0.distcp").read_bytes()
    with caplog.at_level("WARNING"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, save_total_limit=2, resume_from_checkpoint=str(run / "step4")), callbacks=[StopAt(6)])
    assert "later checkpoints of the run it rolls back are set aside" in caplog.text
    # The new run's step6 is the newest, and --save_total_limit counted only its own history.
    assert [path.name for path in checkpoint.step_folders(run)] == ["step4", "step6"]
    assert checkpoint.resolve("latest", run) == run / "step6"
    abandoned = sorted(path.name.split(".abandoned-")[0] for path in run.glob(".step*.abandoned-*"))
    assert abandoned == [".step6", ".step8"]
    (old8,) = run.glob(".step8.abandoned-*")
    assert checkpoint.is_complete(old8) and (old8 / "__0_0.distcp").read_bytes() == old_step8  # nothing is lost
    assert max(r["step"] for r in read_metrics(run)) == 6
    # The run goes on from its own step6.
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, resume_from_checkpoint="latest"))
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))


class SignalAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.step == self.step:
            signal.raise_signal(signal.SIGTERM)


def test_a_signal_stops_after_the_next_step_and_leaves_that_steps_evaluation_to_the_resumed_run(data, capsys):
    """SIGTERM during step 4 is read after step 5, an eval step: the run saves step5 at once, without main/ or the
    evaluation, which the resumed run makes first. Every loss, train and eval, equals an uninterrupted run's."""
    values = dict(max_train_steps=10, eval_every_steps=5, save_every_steps=0,
                  eval_file_pattern=str(data / "validation_*.bin"))
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, output_dir=str(data / "reference"), **values))
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, **values), callbacks=[SignalAt(3)])
    assert "timl: stopped by SIGTERM at step 5 of 10" in capsys.readouterr().out
    assert max(train_losses(data / "run")) == 5 and not (data / "run" / "main").exists()
    assert [r["step"] for r in read_metrics(data / "run") if "eval_loss" in r] == [0]
    assert json.loads((data / "run" / "step5" / "trainer_state.json").read_text())["eval_pending"]
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, **values, resume_from_checkpoint="latest"))
    strip = lambda run: [{k: v for k, v in r.items() if "loss" in k or k == "step"} for r in read_metrics(data / run)]
    assert strip("run") == strip("reference")


def test_keep_last_n_spares_a_checkpoint_until_its_upload_has_finished(data, monkeypatch):
    """step2's upload is held open until the final upload waits for room; at most two uploads wait, so step4's waits
    behind it and step6's and step8's are skipped. Until then every save prunes around the two still uploading."""
    from upload_targets import GatedTarget, open_gate_when_logged

    run, uploads, gate = data / "run", data / "uploads", data / "gate"
    monkeypatch.setattr("timl.checkpoint.upload.upload_target", lambda *args: GatedTarget(uploads, data / "started", gate))
    seen = []
    with open_gate_when_logged(gate, "The upload queue is full; waiting for room",
                               before_opening=lambda: seen.append([p.name for p in checkpoint.step_folders(run)])):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, save_total_limit=1, push_to_hub=True, hub_target=str(uploads)))
    assert seen == [["step2", "step4", "step6", "step8"]]
    # Once step2 was uploaded, the last save's pruning deleted it (step4 may still have been uploading then).
    names = {p.name for p in run.iterdir() if p.is_dir()}
    assert {"main", "step8"} <= names <= {"main", "step4", "step8"}
    assert sorted(p.name for p in uploads.iterdir()) == ["main", "step2", "step4"]


def test_every_file_of_a_checkpoint_is_fsynced_before_its_folder_is_renamed_into_place(data, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", Path(source).resolve(), Path(destination).resolve()))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2))
    monkeypatch.undo()
    run = (data / "run").resolve()
    for name in ("step2", "main"):
        [renamed] = [index for index, event in enumerate(events) if event[0] == "replace" and event[2] == run / name]
        temporary = run / f".{name}.tmp"
        assert events[renamed][1] == temporary
        synced = {path.name for kind, path, *_ in events[:renamed] if kind == "fsync" and path.parent == temporary}
        assert {path.name for path in (run / name).iterdir()} <= synced, name
        assert ("fsync", run) in events[renamed + 1:]  # the rename itself is made durable too


def test_resume_with_another_block_size_or_train_batch_size_says_what_differs(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2))
    with pytest.raises(checkpoint.CheckpointError, match="block_size: checkpoint 16, now 8"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, block_size=8, resume_from_checkpoint=str(data / "run" / "step2")))
    with pytest.raises(checkpoint.CheckpointError, match="train_batch_size: checkpoint 8, now 16"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, train_batch_size=16, resume_from_checkpoint=str(data / "run" / "step2")))


def test_resume_with_other_optimizers_names_the_folder_and_what_differs(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2))
    with pytest.raises(checkpoint.CheckpointError, match=r"run/step2 holds the state of optimizers \['adamw'\], but "
                                                         r"this run has \['muon', 'adamw'\]; resume with the same "
                                                         r"--optim"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, optim="muon", resume_from_checkpoint="latest"))


PWNED = Path(os.environ.get("TMPDIR", "/tmp")) / f"timl_pwned_{os.getpid()}"


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def test_loading_never_unpickles_arbitrary_objects(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2))
    folder = data / "run" / "step2"
    # Whoever can plant a file can rewrite the manifest too (a checksum is no signature): without one, the checkpoint
    # resumes unverified, and the loaders themselves must refuse the pickles.
    (folder / "manifest.json").unlink()
    rng, metadata = (folder / "rng_state_0.pt").read_bytes(), (folder / ".metadata").read_bytes()
    (folder / "rng_state_0.pt").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, max_train_steps=4, resume_from_checkpoint="latest"))
    (folder / "rng_state_0.pt").write_bytes(rng)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(checkpoint.CheckpointError, match=r"step2/\.metadata is not DCP metadata that timl can read"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, max_train_steps=4, resume_from_checkpoint="latest"))
    assert not PWNED.exists()
    (folder / ".metadata").write_bytes(metadata)
    pretrain(ModelArguments(config_overrides=TINY_GPT2),
             tiny_args(data, max_train_steps=4, resume_from_checkpoint="latest"))


def test_a_checkpoint_holds_everything_and_main_loads_with_from_pretrained(data):
    from transformers import AutoModelForCausalLM

    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2, hub_token="hf_SECRET"))
    folder = data / "run" / "step2"
    assert {p.name for p in folder.iterdir()} == {
        ".metadata", "__0_0.distcp", "non_tensor_state.json", "rng_state_0.pt", "loader_state_0.json",
        "trainer_state.json", "config.json", "generation_config.json", "manifest.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["checksum"] == "xxh3_64"
    assert manifest["files"].keys() == {p.name for p in folder.iterdir()} - {"manifest.json", "trainer_state.json"}
    assert manifest["files"]["__0_0.distcp"]["bytes"] == (folder / "__0_0.distcp").stat().st_size
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["tokens"] == 2 * 8 * 16 and state["world_size"] == 1
    assert state["args"]["hub_token"] == "<redacted>" and state["provenance"]["versions"]["torch"]
    assert json.loads((folder / "loader_state_0.json").read_text())["position"] == 2 * 8 * 16
    # main/ is the model alone, as from_pretrained expects it: no optimizer, RNG or loader state.
    main = data / "run" / "main"
    assert sorted(p.name for p in main.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    AutoModelForCausalLM.from_pretrained(main)


def test_uploads_reach_a_local_target_and_the_token_is_never_written_or_printed(data):
    token = "hf_TOPSECRETtoken123456"
    uploads = data / "uploads"
    process = launch(argv(data, data / "run", "--max_train_steps", "20", "--push_to_hub", "true", "--hub_target",
                          str(uploads), "--hub_model_id", "someone/tiny", "--hub_token", token))
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert token not in stdout and token not in stderr
    for path in [*(data / "run").rglob("*"), *uploads.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert (uploads / "main" / "model.safetensors").read_bytes() == \
        (data / "run" / "main" / "model.safetensors").read_bytes()
    # The step revision was exported from the sharded training state by the upload process: a model, nothing else.
    from safetensors.torch import load_file

    step = uploads / "step20"
    assert not list(step.glob("*.distcp")) and not (step / ".metadata").exists()
    assert not list(step.glob("optimizer*")) and not list(step.glob("rng_state*"))
    exported, final = load_file(step / "model.safetensors"), load_file(uploads / "main" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert AutoModelForCausalLM.from_pretrained(step).config.n_layer == 2
    assert not list((data / "run").glob(".step*.export"))  # the staging folder is gone


def test_a_resumed_run_continues_the_same_wandb_run(data, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(data))  # no login: W&B runs offline
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2, report_to="wandb"))
    run_id = json.loads((data / "run" / "step2" / "trainer_state.json").read_text())["tracker_run_ids"]["wandb"]
    pretrain(ModelArguments(config_overrides=TINY_GPT2),
             tiny_args(data, max_train_steps=4, report_to="wandb", resume_from_checkpoint="latest"))
    # Each run folder holds run-<id>.wandb. Folder names are no guide: W&B suffixes one started in the same
    # second as another ("...-<id>-1").
    wandb_dir = data / "run" / "wandb"
    logs = list(wandb_dir.glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and {path.stem.removeprefix("run-") for path in logs} == {run_id}
    assert (wandb_dir / "latest-run" / f"run-{run_id}.wandb").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(script: Path, logs: Path, *per_node_args: list[str]) -> list[tuple[int, str]]:
    """Two 'nodes' of one process each on this host, as two torchrun launches that meet at a static rendezvous;
    returns each one's exit status and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "ACCELERATE_USE_CPU": "true"}
    port, nodes = free_port(), []
    for rank, args in enumerate(per_node_args):
        # Files, not pipes: a node blocked on a full pipe would stall the other at the next collective.
        with open(logs / f"node{rank}.log", "w") as log:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
                 *args], env=env, stdout=log, stderr=subprocess.STDOUT))
    return [(node.wait(timeout=600), (logs / f"node{rank}.log").read_text()) for rank, node in enumerate(nodes)]


def test_a_run_resumes_on_two_nodes_from_one_process_and_back_at_the_same_data_position(data):
    """1 process saves; two nodes resume it, train and save; 1 process resumes theirs. The data continues at the
    same token, so with dropout off every loss equals the uninterrupted run's (up to the order of the sums)."""
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, output_dir=str(data / "reference")))
    reference = train_losses(data / "reference")
    shutil.copytree(data / "reference" / "step2", data / "nodes" / "step2")
    recipe = ["--model_name", "gpt2", "--config_overrides", TINY_GPT2, "--output_dir", str(data / "nodes"),
              "--train_file_pattern", str(data / "train_*.bin"), "--block_size", "16", "--train_batch_size", "8",
              "--per_device_train_batch_size", "4", "--max_train_steps", "8", "--save_every_steps", "2",
              "--log_every_steps", "1", "--eval_every_steps", "0", "--report_to", "none", "--optim", "adamw_torch",
              "--resume_from_checkpoint", "latest"]
    for status, log in launch_two_nodes(ROOT / "recipes" / "gpt2_c4.py", data, recipe, recipe):
        assert status == 0, log[-3000:]
    two_nodes = train_losses(data / "nodes")
    assert list(two_nodes) == list(range(3, 9))
    assert two_nodes == pytest.approx({step: reference[step] for step in range(3, 9)}, rel=1e-5)
    step4 = data / "nodes" / "step4"
    assert json.loads((step4 / "trainer_state.json").read_text())["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", "rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in step4.iterdir()}
    loader_state = lambda folder, rank=0: json.loads((folder / f"loader_state_{rank}.json").read_text())
    assert loader_state(step4) == loader_state(step4, 1) == loader_state(data / "reference" / "step4")

    for later in ("step6", "step8"):
        (data / "nodes" / later).rename(data / "nodes" / f".{later}.set_aside")
    pretrain(ModelArguments(config_overrides=TINY_GPT2),
             tiny_args(data, output_dir=str(data / "nodes"), resume_from_checkpoint="latest"))
    one_again = train_losses(data / "nodes")
    assert one_again == pytest.approx({step: reference[step] for step in range(3, 9)}, rel=1e-5)


def test_an_output_dir_that_one_node_cannot_see_is_refused_on_every_rank(tmp_path):
    """Two processes, each the first of its own 'node' (local rank 0), given output folders that differ, as a
    folder on a node's local disk would."""
    results = tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    nodes = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "workers" / "dcp_worker.py"), "shared",
                               str(tmp_path / f"node{rank}"), str(results)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for rank in (0, 1)]
    assert [node.wait(timeout=600) for node in nodes] == [0, 0]
    for rank in (0, 1):
        message = (results / f"rank{rank}.txt").read_text()
        assert message.startswith(f"CheckpointError: --output_dir {tmp_path / f'node{rank}'} is not shared between "
                                  f"the nodes: rank 0 wrote a file there that the node(s) of rank(s) [1] cannot "
                                  f"read"), message
        assert "must be on a filesystem that all nodes mount at the same path" in message
    assert not list((tmp_path / "node0").iterdir())  # the token is cleaned up


# Checkpoints you can trust: verified on resume, and a failed save that says what to do.


@pytest.fixture
def steps_2_and_4(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=4))
    return data / "run"


def test_latest_skips_a_truncated_shard_naming_it_and_resumes_the_one_before(data, steps_2_and_4, caplog):
    run = steps_2_and_4
    shard = run / "step4" / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    with caplog.at_level("WARNING"):
        assert checkpoint.resolve("latest", run) == run / "step2"
    assert f"Skipping {run / 'step4'}, which stays in place: __0_0.distcp is {size // 2} bytes instead of {size}" \
        in caplog.text
    assert shard.stat().st_size == size // 2
    # Named explicitly, it is refused with the file, not torch's "PytorchStreamReader failed reading zip archive".
    with pytest.raises(checkpoint.CheckpointError, match=rf"step4 is not a complete timl checkpoint: __0_0\.distcp is "
                                                         rf"{size // 2} bytes instead of {size}"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, max_train_steps=6, resume_from_checkpoint=str(run / "step4")))
    caplog.clear()
    with caplog.at_level("INFO"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, max_train_steps=6, resume_from_checkpoint="latest"))
    assert f"Resumed from {run / 'step2'} at step 2" in caplog.text
    assert [p.name for p in checkpoint.step_folders(run)] == ["step2", "step4", "step6"]


def test_a_flipped_byte_fails_the_checksum(steps_2_and_4, caplog):
    run = steps_2_and_4
    shard = run / "step4" / "__0_0.distcp"
    contents = bytearray(shard.read_bytes())
    contents[len(contents) // 2] ^= 0x01
    shard.write_bytes(contents)
    with caplog.at_level("WARNING"):
        assert checkpoint.resolve("latest", run) == run / "step2"
    assert "__0_0.distcp fails its checksum: xxh3_64 " in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match=r"step4 is not a complete timl checkpoint: __0_0\.distcp "
                                                         r"fails its checksum: xxh3_64 [0-9a-f]{16}, not [0-9a-f]{16}"):
        checkpoint.resolve(str(run / "step4"), run)


def test_when_no_checkpoint_verifies_resuming_is_refused_with_each_ones_problem(data, steps_2_and_4):
    run = steps_2_and_4
    (run / "step2" / "rng_state_0.pt").unlink()
    (run / "step4" / "trainer_state.json").write_text("{")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.resolve("latest", run)
    assert str(refused.value).startswith(
        f"No checkpoint in {run} verifies, so the run cannot resume:\n  {run / 'step4'}: trainer_state.json is not a "
        f"trainer state (")
    assert f"\n  {run / 'step2'}: rng_state_0.pt is missing\n" in str(refused.value)
    assert checkpoint.resolve("latest", data / "nothing_yet") is None


def test_a_checkpoint_saved_before_manifests_resumes_with_a_warning(data, steps_2_and_4, caplog):
    run = steps_2_and_4
    for folder in checkpoint.step_folders(run):
        (folder / "manifest.json").unlink(missing_ok=True)
    with caplog.at_level("INFO"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2),
                 tiny_args(data, max_train_steps=6, resume_from_checkpoint="latest"))
    assert (f"{run / 'step4'} has no manifest.json (timl saved it before it wrote manifests): its files cannot be "
            f"verified") in caplog.text
    assert f"Resumed from {run / 'step4'} at step 4" in caplog.text


@contextmanager
def small_filesystem(directory: Path, size: str):
    """A tmpfs of `size` mounted at `directory` (made here): a disk that really fills up."""
    directory.mkdir()
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root, and this test runs as uid {os.geteuid()}")
    if shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs the mount command, which is not on PATH")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed (exit {mounted.returncode}): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_full_disk_stops_the_run_with_what_failed_and_how_to_continue(data, caplog):
    with small_filesystem(data / "small", "2m") as run:
        pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, output_dir=str(run), max_train_steps=2))
        step2 = sum(path.stat().st_size for path in (run / "step2").iterdir())
        # Room for half a checkpoint more: step 4's shard cannot fit.
        with open(run / "filler", "wb") as filler:
            filler.write(b"\0" * (shutil.disk_usage(run).free - step2 // 2))
        # Built, not loaded: from_pretrained would map main/'s weights from the tmpfs and keep it busy.
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "main"))
        parameters = sum(parameter.numel() for parameter in model.parameters())
        assert checkpoint.checkpoint_bytes_estimate(model, data / "no_checkpoint_yet") == parameters * 4 * 3
        estimate = checkpoint.checkpoint_bytes_estimate(model, run)
        assert estimate == step2
        with caplog.at_level("WARNING"):
            assert not checkpoint.check_free_space(run, estimate)
        assert f"{run} has " in caplog.text and "less than two checkpoints of about" in caplog.text
        with pytest.raises(checkpoint.CheckpointSaveError) as failed:
            pretrain(ModelArguments(config_overrides=TINY_GPT2),
                     tiny_args(data, output_dir=str(run), max_train_steps=4, resume_from_checkpoint="latest"))
        message = str(failed.value)
        assert message.startswith(f"Could not save the checkpoint {run / 'step4'}:\n  rank 0 could not write "
                                  f"{run / '.step4.tmp' / '__0_0.distcp'}: [Errno 28] No space left on device\n"
                                  f"{run} has "), message
        assert " free. The unfinished checkpoint is removed and the earlier ones are intact. The last complete " \
               f"checkpoint is {run / 'step2'}: once there is room (or the cause is fixed), continue from it with " \
               "--resume_from_checkpoint latest." in message
        assert not list(run.glob(".step*")) and not list(run.glob(".main*"))
        assert [p.name for p in checkpoint.step_folders(run)] == ["step2"]
        assert checkpoint.verify(run / "step2") == []


def test_a_failed_export_of_main_leaves_no_half_folder_and_names_the_file(data, monkeypatch):
    def full_disk(checkpoint_dir, out_dir):
        (Path(out_dir) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(28, os.strerror(28), str(Path(out_dir) / "model.safetensors"))

    monkeypatch.setattr(checkpoint, "export_hf_model", full_disk)
    run = data / "run"
    with pytest.raises(checkpoint.CheckpointSaveError, match=rf"rank 0 could not write {run / '.main.tmp'}/model\."
                                                             rf"safetensors: \[Errno 28\] No space left on device"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, max_train_steps=2))
    assert not list(run.glob(".main*")) and not (run / "main").exists()
    assert checkpoint.verify(run / "step2") == []  # published before the export, and whole


def run_worker(*args: str, processes: int = 2) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run([*launcher, str(ROOT / "tests" / "workers" / "dcp_worker.py"), *args], env=WORKER_ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_save_that_fails_on_rank_1_alone_stops_both_ranks_with_the_same_error(data, tmp_path):
    """Rank 1 can write no more bytes from step 3 on (a real EFBIG from the kernel): the save of step 4 fails there,
    and rank 0, whose writes all succeed, raises the same error rather than waiting for rank 1 forever."""
    run, results = data / "run", tmp_path / "results"
    results.mkdir()
    run_worker("stop_writing_on_rank_1", str(results), *tiny_recipe(data, run, max_train_steps=4))
    messages = [(results / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1], messages
    assert messages[0].startswith(f"CheckpointSaveError: Could not save the checkpoint {run / 'step4'}:\n  rank 1 "
                                  f"could not write {run / '.step4.tmp' / '__1_0.distcp'}: [Errno 27] File too "
                                  f"large\n{run} has "), messages[0]
    assert f"The last complete checkpoint is {run / 'step2'}" in messages[0]
    assert not list(run.glob(".step*"))
    assert [p.name for p in checkpoint.step_folders(run)] == ["step2"] and checkpoint.verify(run / "step2") == []


def test_two_ranks_verify_half_the_files_each_and_agree(data, tmp_path):
    run, results = data / "run", tmp_path / "results"
    results.mkdir()
    finish(launch(tiny_recipe(data, run, max_train_steps=4), processes=2))
    step4 = run / "step4"
    files = json.loads((step4 / "manifest.json").read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", "rng_state_0.pt", "rng_state_1.pt", "loader_state_0.json",
            "loader_state_1.json", ".metadata", "non_tensor_state.json", "config.json"} <= files.keys()
    shard = bytearray((step4 / "__1_0.distcp").read_bytes())
    shard[-100] ^= 0x01
    (step4 / "__1_0.distcp").write_bytes(shard)
    run_worker("resolve_latest", str(run), str(results))
    ranks = [json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["resolved"] for rank in ranks] == [str(run / "step2")] * 2
    # Each file of step4 was read once, by one rank or the other, and both ranks read some.
    hashed = [{Path(path).name for path in rank["hashed"] if Path(path).parent == step4} for rank in ranks]
    assert hashed[0] and hashed[1] and not hashed[0] & hashed[1] and hashed[0] | hashed[1] == files.keys()
    [warning] = ranks[0]["warnings"]
    assert warning.startswith(f"Skipping {step4}, which stays in place: __1_0.distcp fails its checksum")
    assert ranks[1]["warnings"] == []

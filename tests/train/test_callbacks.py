"""Callbacks: the events fire in order, and a callback can stop a run (which then resumes to the end), ask for a save or
an evaluation now, and stop early on a flat eval loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.checkpoint import manager as checkpoint
from timl.config import ModelArguments, TrainingArguments
from timl.train.callbacks import EarlyStopping, TrainerCallback
from timl.train.pretrain import pretrain


@pytest.fixture
def data(tmp_path):
    write_learnable_shards(tmp_path, 8192, "train", seed=0)
    write_learnable_shards(tmp_path, 640, "validation", seed=1)
    return tmp_path


def tiny_args(data_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(data_dir / "run"), train_file_pattern=str(data_dir / "train_*.bin"),
                  eval_file_pattern=str(data_dir / "validation_*.bin"), block_size=16, train_batch_size=8,
                  per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=3e-3, warmup_steps=0,
                  max_train_steps=6, log_every_steps=1, eval_every_steps=0, save_every_steps=0, report_to="none",
                  optim="adamw_torch")
    return TrainingArguments(**{**values, **overrides})


def train(args: TrainingArguments, *callbacks: TrainerCallback) -> dict[str, float]:
    return pretrain(ModelArguments(config_overrides=TINY_GPT2), args, callbacks=list(callbacks))


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("train_begin", state.step))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.step))

    def on_log(self, args, state, control, *, logs, **kwargs):
        self.events.append(("log", state.step, "eval" if "eval_loss" in logs else "train"))

    def on_evaluate(self, args, state, control, *, metrics, **kwargs):
        self.events.append(("evaluate", state.step))

    def on_save(self, args, state, control, *, checkpoint, **kwargs):
        self.events.append(("save", state.step, checkpoint.name))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("train_end", state.step))


class At(TrainerCallback):
    """Sets control fields when a step ends: {step: {"should_save": True, ...}}."""

    def __init__(self, requests: dict[int, dict[str, bool]]):
        self.requests = requests

    def on_step_end(self, args, state, control, **kwargs):
        for name, value in self.requests.get(state.step, {}).items():
            setattr(control, name, value)


def test_the_events_fire_in_order(data):
    recorder = Recorder()
    train(tiny_args(data, max_train_steps=4, log_every_steps=2, eval_every_steps=2, save_every_steps=2), recorder)
    assert recorder.events == [
        ("train_begin", 0),
        ("log", 0, "eval"), ("evaluate", 0),
        ("step_end", 1),
        ("step_end", 2), ("log", 2, "train"),
        ("log", 2, "eval"), ("evaluate", 2), ("save", 2, "step2"),
        ("step_end", 3),
        ("step_end", 4), ("log", 4, "train"),
        ("log", 4, "eval"), ("evaluate", 4), ("save", 4, "step4"),
        ("train_end", 4),
    ]


def test_a_callback_stops_the_run_with_a_checkpoint_and_it_resumes_to_the_end_exactly(data, capsys):
    reference = train(tiny_args(data, output_dir=str(data / "reference")))
    recorder = Recorder()
    stopped = train(tiny_args(data), At({3: {"should_training_stop": True}}), recorder)
    assert recorder.events[-2:] == [("save", 3, "step3"), ("train_end", 3)]
    assert [r["step"] for r in read_metrics(data / "run")] == [1, 2, 3]
    assert checkpoint.is_complete(data / "run" / "step3") and (data / "run" / "main" / "model.safetensors").exists()
    summary = capsys.readouterr().out
    assert f"timl: stopped by At at step 3 of 6, after {3 * 128:,} tokens" in summary
    assert "to continue it: the same command with --resume_from_checkpoint latest" in summary

    resumed = train(tiny_args(data, resume_from_checkpoint="latest"))
    losses = lambda run: {r["step"]: r["train_loss"] for r in read_metrics(data / run) if "train_loss" in r}
    assert losses("run") == losses("reference")  # to the bit
    assert (resumed["train_loss"], resumed["eval_loss"]) == (reference["train_loss"], reference["eval_loss"])
    assert stopped["train_loss"] == losses("reference")[3]
    assert "timl: trained on" in capsys.readouterr().out


def test_save_now_and_evaluate_now_are_done_before_the_next_step(data):
    recorder = Recorder()
    train(tiny_args(data), At({3: {"should_save": True}, 5: {"should_evaluate": True}}), recorder)
    assert [event for event in recorder.events if event[0] in ("save", "evaluate")] == [
        ("save", 3, "step3"), ("evaluate", 5), ("evaluate", 6), ("save", 6, "step6")]
    assert sorted(path.name for path in checkpoint.step_folders(data / "run")) == ["step3", "step6"]
    assert [r["step"] for r in read_metrics(data / "run") if "eval_loss" in r] == [5, 6]


def test_early_stopping_stops_when_the_eval_loss_stays_flat_and_keeps_its_count_on_resume(data):
    # At learning rate 0 the model never changes: step 0's eval is the best, and each later one fails to beat it.
    args = dict(learning_rate=0.0, max_train_steps=20, eval_every_steps=2)
    train(tiny_args(data, **args, early_stopping_patience=3))
    assert [r["step"] for r in read_metrics(data / "run") if "eval_loss" in r] == [0, 2, 4, 6]
    saved = json.loads((data / "run" / "step6" / "trainer_state.json").read_text())["callbacks"]["EarlyStopping"]
    assert saved["evals_without_improvement"] == 3 and (data / "run" / "main").exists()

    # Resumed with a larger patience, it goes on from its count: two more flat evals, then it stops again.
    train(tiny_args(data, **args, resume_from_checkpoint="latest"), EarlyStopping(patience=5))
    assert [r["step"] for r in read_metrics(data / "run") if "eval_loss" in r] == [0, 2, 4, 6, 8, 10]


def test_early_stopping_patience_needs_an_evaluation(data):
    with pytest.raises(ValueError, match="--early_stopping_patience needs an evaluation"):
        train(tiny_args(data, eval_file_pattern=None, early_stopping_patience=2))

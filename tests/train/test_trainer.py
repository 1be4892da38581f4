"""The Trainer on the CPU: learning, exact eval loss, hooks, DDP over gloo, the original command line, and the run's
lifecycle: resume, a finished run, the summary of a resumed run, a crash."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import SchedulerType

import nonfinite_worker
from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from uneven_batches import GradientRecorder, UnevenLoader, global_batch, micro_batch_mean_loss, token_mean_loss
from timl.checkpoint import manager as checkpoint
from timl.config import ModelArguments, TrainingArguments, parse_args
from timl.config.arguments import METRIC_SCHEDULERS
from timl.report import summary
from timl.report.metrics import Accuracy, Perplexity
from timl.optim import OptimizerSet
from timl.train.pretrain import make_model, pretrain
from timl.checkpoint.run_folder import LOCK_FILE
from timl.data.shards import write_shard
from timl.train.trainer import NonFiniteLossError, Trainer
from timl.train.step import StepSignals

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path):
    write_learnable_shards(tmp_path, 8192, "train", seed=0)
    eval_stream = write_learnable_shards(tmp_path, 640, "validation", seed=1)
    return tmp_path, eval_stream


def tiny_args(data_dir: Path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(data_dir / "run"), train_file_pattern=str(data_dir / "train_*.bin"),
        eval_file_pattern=str(data_dir / "validation_*.bin"), block_size=16, train_batch_size=8,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=3e-3, warmup_steps=2,
        max_train_steps=40, log_every_steps=5, eval_every_steps=20, save_every_steps=0, report_to="none",
        optim="adamw_torch",
    )
    return TrainingArguments(**{**values, **overrides})


def test_tiny_gpt2_learns_and_logs_every_field(data):
    data_dir, _ = data
    args = tiny_args(data_dir)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args)
    records = read_metrics(data_dir / "run")
    evals = [r for r in records if "eval_loss" in r]
    trains = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert [r["step"] for r in trains] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert evals[0]["eval_loss"] == pytest.approx(np.log(64), rel=0.1)  # about ln(vocab) at initialisation
    assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]
    assert trains[-1]["train_loss"] < trains[0]["train_loss"]
    for key in ("lr", "grad_norm", "tokens", "tokens_per_second", "step_seconds"):
        assert key in trains[-1]
    assert trains[-1]["tokens"] == 40 * 8 * 16
    assert (data_dir / "run" / "step40" / "trainer_state.json").exists()
    assert (data_dir / "run" / "main" / "model.safetensors").exists()
    assert (data_dir / "run" / "main" / "config.json").exists()


def test_a_fresh_trainer_evaluates_before_training_and_writes_nothing(data):
    data_dir, _ = data
    args = tiny_args(data_dir)
    values = Trainer(make_model(ModelArguments(config_overrides=TINY_GPT2), args), args).evaluate()
    assert values["eval_loss"] == pytest.approx(np.log(64), rel=0.1)  # about ln(vocab) at initialisation
    assert not (data_dir / "run").exists()


def test_evaluation_runs_compiled_when_training_is_and_gives_the_eager_values(data):
    data_dir, _ = data
    args = tiny_args(data_dir, max_eval_steps=2)
    eager = Trainer(make_model(ModelArguments(config_overrides=TINY_GPT2), args), args).evaluate()
    compiled_args = dataclasses.replace(args, torch_compile=True)
    trainer = Trainer(make_model(ModelArguments(config_overrides=TINY_GPT2), compiled_args), compiled_args)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = trainer.evaluate()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the evaluation's forward was compiled
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-5)


def test_logged_eval_loss_equals_an_independent_cross_entropy_of_the_saved_model(data):
    data_dir, eval_stream = data
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data_dir, max_train_steps=6))
    logged = [r for r in read_metrics(data_dir / "run") if "eval_loss" in r][-1]
    assert logged["step"] == 6

    model = AutoModelForCausalLM.from_pretrained(data_dir / "run" / "main").eval()
    tokens = torch.tensor(eval_stream.astype(np.int64))
    assert len(tokens) % 64 == 0  # whole eval batches, so every token is evaluated
    inputs = tokens.view(-1, 16)
    targets = torch.cat([tokens[1:], torch.tensor([-100])]).view(-1, 16)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert logged["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_custom_loss_and_metrics_are_called_at_train_and_eval(data):
    data_dir, _ = data
    calls = {"loss": 0}

    def mean_loss(outputs, inputs):
        calls["loss"] += 1
        return F.cross_entropy(outputs.logits.flatten(0, 1), inputs["labels"].flatten(), ignore_index=-100)

    train_accuracy, eval_accuracy = Accuracy(), Accuracy()
    args = tiny_args(data_dir, max_train_steps=4, log_every_steps=2, eval_every_steps=2, train_batch_size=8,
                     per_device_train_batch_size=2)
    latest = pretrain(ModelArguments(config_overrides=TINY_GPT2), args, compute_loss_func=mean_loss,
                      train_metrics=[train_accuracy, Perplexity()], eval_metrics=[eval_accuracy, Perplexity()])
    assert calls["loss"] == 4 * 4  # four steps of four micro-batches
    records = read_metrics(data_dir / "run")
    assert all(0 <= r["train_accuracy"] <= 1 and r["train_perplexity"] > 1 for r in records if "train_loss" in r)
    assert all(0 <= r["eval_accuracy"] <= 1 for r in records if "eval_loss" in r)
    assert latest["eval_perplexity"] == pytest.approx(np.exp(latest["eval_loss"]), rel=1e-6)


def test_a_micro_batch_mean_loss_weighs_in_by_its_tokens(data):
    """Four micro-batches a step hold 17, 5, 29 and 6 labelled positions of 32 (-100 elsewhere). The first step logs
    the token mean of one forward, and the same data and seed give the same losses, step after step, with the
    default loss and with a two-argument mean loss: its gradients too weigh in by labelled tokens, not positions."""
    data_dir, _ = data
    _, labels = global_batch(step=0)
    assert (labels != -100).view(4, -1).sum(dim=1).tolist() == [17, 5, 29, 6]
    losses = {}
    for name, loss in (("default", None), ("mean", micro_batch_mean_loss)):
        args = tiny_args(data_dir, output_dir=str(data_dir / name), per_device_train_batch_size=2, max_train_steps=3,
                         log_every_steps=1, eval_every_steps=0)
        pretrain(ModelArguments(config_overrides=TINY_GPT2), args, train_loader_factory=UnevenLoader,
                 compute_loss_func=loss)
        losses[name] = [r["train_loss"] for r in read_metrics(data_dir / name) if "train_loss" in r]
    with torch.no_grad():
        token_mean = token_mean_loss(make_model(ModelArguments(config_overrides=TINY_GPT2), args)).item()
    assert losses["default"][0] == pytest.approx(token_mean, rel=1e-6)
    assert len(losses["mean"]) == 3 and losses["mean"] == pytest.approx(losses["default"], rel=1e-5)


def run_recipe(argv: list[str], env_extra: dict[str, str] | None = None, torchrun: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / "recipes" / "gpt2_c4.py"), *argv], env=env, capture_output=True,
                          text=True, timeout=600)


def recipe_argv(data_dir: Path, output_dir: Path, per_device: int, **flags: str) -> list[str]:
    """The recipe's command line for a tiny run; `flags` (name: value) replace or add to the defaults."""
    values = {"model_name": "gpt2", "config_overrides": TINY_GPT2, "output_dir": str(output_dir),
              "train_file_pattern": str(data_dir / "train_*.bin"),
              "eval_file_pattern": str(data_dir / "validation_*.bin"), "block_size": "16", "train_batch_size": "8",
              "per_device_train_batch_size": str(per_device), "per_device_eval_batch_size": "4",
              "max_train_steps": "6", "log_every_steps": "1", "eval_every_steps": "3", "save_every_steps": "0",
              "report_to": "none", "optim": "adamw_torch", "learning_rate": "3e-3", **flags}
    return [word for name, value in values.items() for word in (f"--{name}", value)]


def test_two_processes_over_gloo_match_one_process_with_twice_the_accumulation(data):
    """The two ranks log the losses of one process, step after step, and its grad norms. AdamW alone would cancel a
    gradient's scale: with an epsilon above every element of the gradient (most are about 0.01, the largest 0.4) and
    no clipping, its update is about lr / epsilon × the gradient's momentum, so ranks that weighed their shares of
    the loss wrongly would train another model, and log other losses."""
    data_dir, _ = data
    in_proportion = dict(adam_epsilon="1", learning_rate="0.1", max_grad_norm="0")
    # The one-process run is made in this process (a launch costs seconds of imports); the two ranks are launched.
    pretrain(*parse_args(ModelArguments, TrainingArguments,
                         argv=recipe_argv(data_dir, data_dir / "one", per_device=2, **in_proportion)))
    double = run_recipe(recipe_argv(data_dir, data_dir / "two", per_device=2, **in_proportion),
                        {"ACCELERATE_USE_CPU": "true"}, torchrun=True)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = read_metrics(data_dir / "one"), read_metrics(data_dir / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    # The losses first: a wrong weighting must show in them, not only in the grad norm.
    for key in ("train_loss", "eval_loss", "grad_norm"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-5), key
    assert sum("train_loss" in r for r in one) == 6 and sum("eval_loss" in r for r in one) == 3


ORIGINAL_COMMAND = (
    "--model_name gpt2 --output_dir {out} --train_file_pattern {data}/train_*.bin "
    "--eval_file_pattern {data}/validation_*.bin --max_eval_tokens 10485760 --block_size 1024 --train_batch_size 512 "
    "--per_device_train_batch_size 32 --per_device_eval_batch_size 64 --learning_rate 6e-4 --weight_decay 0.1 "
    "--adam_beta1 0.8 --adam_beta2 0.95 --adam_epsilon 1e-8 --max_grad_norm 1.0 --optim adamw_torch_fused "
    "--lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs {{\"min_lr\":0.00001}} --warmup_ratio 0.01 "
    "--log_every_steps 1 --save_every_steps 1000 --eval_every_steps 100 --wandb_project timl --wandb_run_name "
    "gpt2_c4 --push_to_hub true --hub_model_id tim-lawson/gpt2_c4_example --debug true"
)


def test_the_original_command_line_runs_offline_in_debug_mode(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train_000000.bin", rng.integers(0, 256, 600_000).astype(np.uint16))
    write_shard(tmp_path / "validation_000000.bin", rng.integers(0, 256, 70_000).astype(np.uint16))
    argv = ORIGINAL_COMMAND.format(out=tmp_path / "out", data=tmp_path).split()
    # A tiny model, and a step of one micro-batch instead of 16 of 32 × 1024 tokens: every flag is still parsed and
    # used.
    argv += ["--config_overrides", "n_layer=1,n_embd=8,n_head=1,vocab_size=256", "--train_batch_size", "32"]
    result = run_recipe(argv, {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "out")
    assert [r["step"] for r in records if "train_loss" in r] == [1]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 1]
    assert (tmp_path / "out" / "main" / "model.safetensors").exists()


def test_timl_train_is_the_original_command_line_under_a_launcher_too(data):
    """`timl train` runs what recipes/gpt2_c4.py runs; `torchrun -m timl train` starts it on every process."""
    data_dir, _ = data
    argv = recipe_argv(data_dir, data_dir / "run", per_device=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "timl", "train", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(data_dir / "run") if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((data_dir / "run" / "run_config.json").read_text())["world_size"] == 2
    assert (data_dir / "run" / "main" / "model.safetensors").exists()


def test_arguments_load_from_yaml(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("model_name: gpt2\nconfig_overrides: n_layer=2\nblock_size: 128\ntrain_batch_size: 64\n"
                    "per_device_train_batch_size: 8\nlr_scheduler_type: warmup_stable_decay\n"
                    "lr_scheduler_kwargs:\n  num_decay_steps: 10\nreport_to: none\n")
    model_args, args = parse_args(ModelArguments, TrainingArguments, argv=[str(path)])
    assert model_args.config_overrides == "n_layer=2"
    assert args.block_size == 128 and args.gradient_accumulation_steps == 8
    assert args.lr_scheduler_kwargs == {"num_decay_steps": 10}


def test_bad_arguments_are_all_reported_at_once(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as error:
        TrainingArguments(train_file_pattern=str(tmp_path / "missing_*.bin"), train_batch_size=10,
                          per_device_train_batch_size=4, max_train_steps=5, max_train_tokens=100,
                          lr_scheduler_type="bogus", lr_scheduler_kwargs="{not json", report_to="nonsense",
                          push_to_hub=True)
    message = str(error.value)
    for expected in ("--train_batch_size 10 is not a multiple",
                     "--max_train_steps and --max_train_tokens contradict", "--lr_scheduler_type 'bogus'",
                     "--lr_scheduler_kwargs is not valid JSON", "unknown trackers: nonsense",
                     "--push_to_hub needs --hub_model_id"):
        assert expected in message
    # The files are checked when the run starts, before the model is built.
    args = TrainingArguments(train_file_pattern=str(tmp_path / "missing_*.bin"),
                             eval_file_pattern=str(tmp_path / "nothing_*.bin"), report_to="none",
                             output_dir=str(tmp_path / "run"))

    def no_model(*_):
        raise AssertionError("the model was built before the files were checked")

    monkeypatch.setattr("timl.train.pretrain.make_model", no_model)
    with pytest.raises(ValueError) as error:
        pretrain(ModelArguments(config_overrides=TINY_GPT2), args)
    assert "--train_file_pattern: No file matches" in str(error.value)
    assert "--eval_file_pattern: No file matches" in str(error.value)


def test_block_size_beyond_the_model_fails_before_training(data):
    data_dir, _ = data
    with pytest.raises(ValueError, match="--block_size 128 exceeds the model's 64 positions"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data_dir, block_size=128))


def test_without_a_wandb_login_wandb_runs_offline_and_says_so(data, monkeypatch, caplog):
    data_dir, _ = data
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(data_dir))  # no ~/.netrc, so no login
    args = tiny_args(data_dir, max_train_steps=2, report_to="wandb", wandb_run_name="offline-test")
    with caplog.at_level("WARNING"):
        pretrain(ModelArguments(config_overrides=TINY_GPT2), args)
    assert sum("W&B runs offline" in record.message for record in caplog.records) == 1
    runs = list((data_dir / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


class PositionAtCreation:
    """A loader whose iterator takes the loader's position when it is made, as a class-based iterator (torchdata's
    StatefulDataLoader) does. It serves batch k of a fixed token stream as its k-th batch, and records which."""

    def __init__(self, stream: np.ndarray, batch_size: int, block_size: int):
        self.stream = torch.from_numpy(stream.astype(np.int64))
        self.batch_size, self.block_size = batch_size, block_size
        self.position, self.served = 0, []

    def __iter__(self):
        return _BatchesFrom(self, self.position)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        size = self.batch_size * self.block_size
        tokens = self.stream[index * size : (index + 1) * size + 1]
        return {"input_ids": tokens[:-1].view(self.batch_size, -1), "labels": tokens[1:].view(self.batch_size, -1)}


class _BatchesFrom:
    def __init__(self, loader: PositionAtCreation, start: int):
        self.loader, self.index = loader, start

    def __next__(self) -> dict[str, torch.Tensor]:
        index, self.index = self.index, self.index + 1
        self.loader.position = self.index
        self.loader.served.append(index)
        return self.loader.batch(index)


def test_a_loader_whose_iterator_takes_its_position_when_made_resumes_at_that_position(data):
    data_dir, _ = data
    stream = np.random.default_rng(0).integers(0, 64, 4096)
    loaders = []

    def factory(args, accelerator):
        loaders.append(PositionAtCreation(stream, args.per_device_train_batch_size, args.block_size))
        return loaders[-1]

    values = dict(train_batch_size=4, per_device_train_batch_size=4, eval_every_steps=0)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data_dir, max_train_steps=3, **values),
             train_loader_factory=factory)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data_dir, max_train_steps=6, **values,
             resume_from_checkpoint="latest"), train_loader_factory=factory)
    assert loaders[0].served == [0, 1, 2]
    assert loaders[1].served == [3, 4, 5]


def test_resuming_a_finished_run_writes_nothing_and_says_so(data, capsys):
    data_dir, _ = data
    run = data_dir / "run"
    values = dict(max_train_steps=4, eval_every_steps=2, save_every_steps=2, log_every_steps=1)
    latest = pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data_dir, **values))
    # The run lock is taken and released again (a run checks that no other one is live there): all else stays.
    files = lambda: {path: (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else None)
                     for path in run.rglob("*") if path.name != LOCK_FILE}
    written = files()
    capsys.readouterr()
    again = pretrain(ModelArguments(config_overrides=TINY_GPT2),
                     tiny_args(data_dir, **values, resume_from_checkpoint="latest"))
    assert capsys.readouterr().out == (f"timl: {run} is already finished at step 4 ({run}/main holds its model); "
                                       f"nothing to do.\n")
    assert files() == written  # metrics.jsonl byte for byte, no new folder or file
    assert again == latest
    # An older checkpoint at the last step these arguments ask for: nothing to do either, and nothing rolled back.
    pretrain(ModelArguments(config_overrides=TINY_GPT2),
             tiny_args(data_dir, **{**values, "max_train_steps": 2}, resume_from_checkpoint=str(run / "step2")))
    assert capsys.readouterr().out == (f"timl: {run / 'step2'} is at step 2, and these arguments ask for 2 steps; "
                                       f"nothing to do.\n")
    assert files() == written


def test_the_summary_after_a_resume_covers_the_whole_run(data, tmp_path, capsys, monkeypatch):
    """The first session stops at step 3 of 6; the second one evaluates another eval set (random tokens, so a higher
    loss): the best eval loss is the first session's, and tokens and time are the whole run's."""
    data_dir, _ = data
    write_learnable_shards(tmp_path, 640, "learnable", seed=1)
    write_shard(tmp_path / "random_000000.bin", np.random.default_rng(2).integers(0, 64, 640).astype(np.uint16))
    from timl.train.callbacks import TrainerCallback
    from timl.data.sources import eval_loader

    class StopAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.step == 3

    def run(eval_prefix: str, **overrides):
        factory = functools.partial(eval_loader, pattern=str(tmp_path / f"{eval_prefix}_*.bin"), vocab_size=64)
        return pretrain(ModelArguments(config_overrides=TINY_GPT2),
                        tiny_args(data_dir, max_train_steps=6, eval_every_steps=3, log_every_steps=1, **overrides),
                        eval_loader_factory=factory, callbacks=[StopAtStep3()] if not overrides else [])

    run("learnable")
    checkpoint_seconds = json.loads((data_dir / "run" / "step3" / "trainer_state.json").read_text())[
        "run_state"]["elapsed_seconds"]
    capsys.readouterr()
    render, clock_readings = summary.render, []

    def render_at_one_moment(state, *args, **kwargs):
        # The clock stands still while the summary is written, so that the test knows the very seconds it shows:
        # the shown text rounds them (to whole seconds from 10 s), and a tolerance would have to guess the rounding.
        now = time.perf_counter()
        clock_readings.append((state.seconds_before_session, now - state.session_started))
        with monkeypatch.context() as stopped_clock:
            stopped_clock.setattr(time, "perf_counter", lambda: now)
            return render(state, *args, **kwargs)

    monkeypatch.setattr(summary, "render", render_at_one_moment)
    run("random", resume_from_checkpoint="latest")
    printed = capsys.readouterr().out
    [(before_session, session_seconds)] = clock_readings
    assert before_session == checkpoint_seconds  # the first session's time, as its checkpoint kept it
    assert (f"timl: trained on {6 * 128:,} tokens in {summary.format_seconds(before_session + session_seconds)} "
            f"(this session: steps 3 to 6, {3 * 128:,} tokens in {summary.format_seconds(session_seconds)}).\n"
            in printed), printed
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(data_dir / "run") if "eval_loss" in r}
    assert list(evals) == [0, 3, 6] and evals[3] < evals[6]
    assert f"best eval loss {evals[3]:.4f} at step 3" in printed
    # elapsed_seconds goes on from the checkpoint's, across sessions, up to the summary's.
    resumed = [r["elapsed_seconds"] for r in read_metrics(data_dir / "run") if r["step"] > 3]
    assert resumed == sorted(resumed) and checkpoint_seconds < resumed[0]
    assert resumed[-1] <= before_session + session_seconds
    # So do the timed steps behind the mean tokens/s: each session times all its steps but its first.
    timed = lambda step: json.loads((data_dir / "run" / f"step{step}" / "trainer_state.json").read_text())[
        "run_state"]["timed_tokens"]
    assert timed(3) == 2 * 128 and timed(6) == 4 * 128


class FailsAtBatch:
    """The default train loader, raising at its `index`-th batch, as a failing disk would."""

    def __init__(self, inner, index: int):
        self.inner, self.index = inner, index

    def __iter__(self):
        for index, batch in enumerate(self.inner):
            if index == self.index:
                raise OSError("the disk went away")
            yield batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def test_an_exception_mid_run_closes_the_trackers_and_lets_pending_uploads_finish(data, tmp_path, monkeypatch):
    """A save at step 4 queues an upload that can finish only once the trainer waits for it; the loader then fails
    at step 6. The exception reaches the caller only after the upload is done and the trackers are closed."""
    from accelerate import Accelerator
    from upload_targets import GatedTarget, open_gate_when_logged

    import timl.train.trainer
    from timl.data.sources import train_loader
    from timl.checkpoint.upload import Uploader

    data_dir, _ = data
    uploads = tmp_path / "uploads"
    monkeypatch.setattr(timl.train.trainer, "start_uploader", lambda args: Uploader(
        GatedTarget(uploads, tmp_path / "upload_started", tmp_path / "gate")))
    ended = []
    end_training = Accelerator.end_training
    monkeypatch.setattr(Accelerator, "end_training", lambda self: (ended.append(True), end_training(self))[1])
    # The trainer's wait for the pending upload, long enough that only a hung upload (a broken test) runs out of it.
    args = tiny_args(data_dir, max_train_steps=8, save_every_steps=4, eval_every_steps=0, train_batch_size=4,
                     push_to_hub=True, hub_target=str(uploads), preemption_upload_seconds=600.0)
    factory = lambda args, accelerator: FailsAtBatch(train_loader(args, accelerator, vocab_size=64, seed=0), 5)
    from timl.train.callbacks import TrainerCallback

    class RecordsErrors(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_error(self, args, state, control, *, error, **kwargs):
            self.seen.append((state.step, str(error), bool(ended)))

        def on_train_end(self, args, state, control, **kwargs):
            self.seen.append("on_train_end")

    recorder = RecordsErrors()
    with (open_gate_when_logged(tmp_path / "gate", "Waiting for 1 checkpoint upload(s) to finish"),
          pytest.raises(OSError, match="the disk went away")):
        pretrain(ModelArguments(config_overrides=TINY_GPT2), args, train_loader_factory=factory,
                 callbacks=[recorder])
    assert (uploads / "step4" / "model.safetensors").exists()
    assert ended == [True]
    assert recorder.seen == [(5, "the disk went away", False)]  # once, before the trackers close; no on_train_end
    assert max(r["step"] for r in read_metrics(data_dir / "run")) == 5


@pytest.mark.parametrize("name", [s.value for s in SchedulerType])
def test_schedulers_stepped_on_a_metric_are_refused_and_the_list_matches_transformers(name):
    from transformers import get_scheduler

    needs_kwargs = {"cosine_with_min_lr": {"min_lr": 0.0}, "cosine_warmup_with_min_lr": {"min_lr": 0.0},
                    "warmup_stable_decay": {"num_decay_steps": 2}}
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(name, probe, num_warmup_steps=1, num_training_steps=10,
                              scheduler_specific_kwargs=needs_kwargs.get(name))
    required = [p for p in inspect.signature(scheduler.step).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert bool(required) == (name in METRIC_SCHEDULERS)
    if name in METRIC_SCHEDULERS:
        with pytest.raises(ValueError, match=f"--lr_scheduler_type {name} steps on a metric"):
            TrainingArguments(lr_scheduler_type=name, report_to="none")
    else:
        TrainingArguments(lr_scheduler_type=name, lr_scheduler_kwargs=needs_kwargs.get(name), report_to="none")


def test_grad_norm_is_logged_when_clipping_is_off(data):
    data_dir, _ = data
    norms = {}
    for max_grad_norm in (0.0, 1e9):  # off, and a bound no gradient reaches: the same training
        output_dir = data_dir / f"clip{max_grad_norm}"
        pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(
            data_dir, output_dir=str(output_dir), max_grad_norm=max_grad_norm, max_train_steps=3, log_every_steps=1,
            eval_every_steps=0))
        norms[max_grad_norm] = [r["grad_norm"] for r in read_metrics(output_dir) if "grad_norm" in r]
    assert all(norm > 0 for norm in norms[0.0])
    assert norms[0.0] == pytest.approx(norms[1e9], rel=1e-6)


def test_clipping_scales_the_gradient_of_every_step_down_to_max_grad_norm(data):
    """Four micro-batches a step, and a bound below a thousandth of the gradient norm: the optimizer gets each step's
    whole gradient, in its own direction, scaled to the bound. The optimizer's lr is 0, so the runs with and without
    clipping see the same model and data; the logged norm is the one before clipping."""
    data_dir, _ = data
    bound = 1e-3
    gradients, logged = {}, {}
    for max_grad_norm in (0.0, bound):
        args = tiny_args(data_dir, output_dir=str(data_dir / f"clip{max_grad_norm}"), max_grad_norm=max_grad_norm,
                         per_device_train_batch_size=2, max_train_steps=3, log_every_steps=1, eval_every_steps=0)
        model = make_model(ModelArguments(config_overrides=TINY_GPT2), args)
        recorder = GradientRecorder(model.parameters(), lr=0.0)
        Trainer(model, args, optimizers=(recorder, None)).train()
        # The three training steps come first; saving adds a step on zero gradients (DCP fills the optimizer state).
        gradients[max_grad_norm] = recorder.steps[:3]
        logged[max_grad_norm] = [r["grad_norm"] for r in read_metrics(data_dir / f"clip{max_grad_norm}")
                                 if "grad_norm" in r]
    assert len(logged[0.0]) == 3 and logged[bound] == pytest.approx(logged[0.0], rel=1e-6)
    for whole, clipped, norm in zip(gradients[0.0], gradients[bound], logged[0.0]):
        assert torch.cat([g.flatten() for g in whole]).norm().item() == pytest.approx(norm, rel=1e-5)
        assert norm > 1000 * bound
        assert torch.cat([g.flatten() for g in clipped]).norm().item() == pytest.approx(bound, rel=1e-5)
        for got, want in zip(clipped, whole):
            torch.testing.assert_close(got * (norm / bound), want, rtol=1e-4, atol=1e-7)


def test_step_signals_are_read_one_step_late_or_at_once_before_a_save():
    """Reading a step's own signals would wait for the device every step; all processes read the same values a
    step later, so they still act together. A drain (before a save) reads the last step's at once, and only once."""
    signals = StepSignals(torch.device("cpu"))
    pushed = [signals.push(step, torch.tensor([float(step), 0.0])) for step in (1, 2, 3)]
    assert pushed == [None, (1, [1.0, 0.0]), (2, [2.0, 0.0])]
    assert signals.drain() == (3, [3.0, 0.0])
    assert signals.drain() is None and signals.push(4, torch.tensor([4.0, 1.0])) is None


def strict_json_records(output_dir: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: a bare NaN or Infinity (which Python's json would accept) fails."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_loss_that_turns_nan_stops_the_run_within_a_step_and_saves_nothing_after_it(data):
    """The learning rate of 1e9 without clipping: the loss is NaN from the second step."""
    data_dir, _ = data
    output_dir = data_dir / "run"
    args = tiny_args(data_dir, learning_rate=1e9, max_grad_norm=0.0, max_train_steps=30, log_every_steps=1,
                     eval_every_steps=0, save_every_steps=1, save_total_limit=2)
    with pytest.raises(NonFiniteLossError) as error:
        pretrain(ModelArguments(config_overrides=TINY_GPT2), args)
    records = strict_json_records(output_dir)
    bad = next(r["step"] for r in records if r["train_loss"] is None)
    assert bad >= 2 and records[-1]["step"] <= bad + 1  # stopped within a step of the bad one
    assert records[bad - 1]["grad_norm"] is None
    message = str(error.value)
    assert message.startswith(f"Step {bad}: the loss is nan")
    assert f"the last checkpoint is {output_dir}/step{bad - 1}" in message
    for advice in ("--learning_rate (now 1e+09)", "--max_grad_norm 1.0 (now 0)", "--z_loss_coefficient",
                   "--skip_nonfinite_steps"):
        assert advice in message
    # Nothing was saved after the bad step, the last good checkpoints were kept, and they are finite.
    assert sorted(p.name for p in output_dir.glob("step*")) == sorted({f"step{bad - 1}", f"step{max(bad - 2, 1)}"})
    assert not (output_dir / "main").exists()
    exported = checkpoint.export_hf_model(output_dir / f"step{bad - 1}", data_dir / "exported")
    assert all(torch.isfinite(t).all() for t in load_file(exported / "model.safetensors").values())


def test_skipped_nonfinite_steps_change_no_weight_and_the_run_goes_on(data):
    data_dir, _ = data
    output_dir, clean_dir = data_dir / "run", data_dir / "clean"
    nonfinite_worker.train(data_dir, output_dir, bad_rank=0, bad_step=3, skip=1)
    nonfinite_worker.train(data_dir, clean_dir, bad_rank=0, bad_step=99, skip=0)
    records, clean = strict_json_records(output_dir), strict_json_records(clean_dir)
    assert records[2]["step"] == 3 and records[2]["train_loss"] is None
    assert records[-1]["skipped_steps"] == 1 and "skipped_steps" not in clean[-1]
    assert [r["lr"] for r in records] == [r["lr"] for r in clean]  # the schedule goes on: the step is spent
    assert checkpoint.read_trainer_state(output_dir / "step5")["run_state"]["skipped_steps"] == [3]

    def weights(step: int) -> dict[str, torch.Tensor]:
        exported = checkpoint.export_hf_model(output_dir / f"step{step}", data_dir / f"exported{step}")
        return load_file(exported / "model.safetensors")

    before, after, next_step = weights(2), weights(3), weights(4)
    assert all(torch.equal(before[name], after[name]) for name in before)  # step 3 changed nothing
    assert not all(torch.equal(after[name], next_step[name]) for name in after)  # step 4 trained
    assert (output_dir / "main" / "model.safetensors").exists()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw-flag-on-device", "adamw-flag-read-on-host"])
def test_a_skipped_optimizer_step_leaves_weights_and_state_as_they_were(fused):
    """Fused AdamW takes the skip flag on the device (no wait for the GPU); another optimizer reads it first."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    optimizers = OptimizerSet([optimizer], [scheduler], ["adamw"])

    def step(skip: bool) -> None:
        model(torch.ones(2, 4)).sum().backward()
        optimizers.step(skip=torch.tensor(skip))

    step(False)
    weights = [p.detach().clone() for p in model.parameters()]
    state = {key: value.clone() for key, value in optimizer.state[model.weight].items()}
    step(True)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(state[key], optimizer.state[model.weight][key]) for key in state)  # step count too
    assert scheduler.last_epoch == 2 and model.weight.grad is None
    step(False)
    assert not torch.equal(weights[0], model.weight)


def test_with_two_processes_a_nan_on_one_rank_stops_both_at_the_same_step(data):
    data_dir, _ = data
    output_dir = data_dir / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "workers" / "nonfinite_worker.py"), str(data_dir), str(output_dir),
                           "1", "3", "0"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
                               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    assert done.returncode != 0
    assert done.stderr.count("timl: Step 3: the loss is nan") == 1, done.stderr[-3000:]  # printed once, no traceback
    assert f"the last checkpoint is {output_dir}/step2" in done.stderr
    assert sorted(p.name for p in output_dir.glob("step*")) == ["step1", "step2"]
    assert strict_json_records(output_dir)[2]["train_loss"] is None


def test_under_fsdp2_gradients_reduce_in_fp32_and_outputs_are_not_cast(monkeypatch):
    """Accelerate's own bf16 policy reduces gradients and returns the loss in bf16; timl's plugin keeps bf16 for
    compute alone, as torchtitan does. (The policy the sharded model really runs is checked on the GPU.)"""
    from timl.train.trainer import fsdp_plugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    policy = fsdp_plugin(bf16=True).mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)
    assert fsdp_plugin(bf16=False) is None  # fp32 throughout: nothing to choose
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp_plugin(bf16=True) is None

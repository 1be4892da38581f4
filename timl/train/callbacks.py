"""Callbacks: code that runs at fixed points of the training loop and may steer it, as in transformers' Trainer.

The events, in the order a run fires them:

    on_train_begin   once, after the model, the optimizers and any checkpoint are loaded
    on_step_end      after each optimizer step (state.step has counted it)
    on_log           after each log line: train values every --log_every_steps, eval values after each evaluation
    on_evaluate      after each evaluation, with its values
    on_save          after each checkpoint, with its folder
    on_train_end     once, when the run ends or stops (not after an exception)
    on_error         instead, once, when an exception ends the run (before the uploads' grace and the trackers close)

Each gets `(args, state, control)`: the TrainingArguments, the run's TrainerState, and the TrainerControl through which
it asks the loop to stop (a checkpoint is saved on the way out), to save now or to evaluate now. The loop reads the
requests before the next step. Every process fires every event with the same state, so a callback must decide from the
state (not from a clock or the process's rank) for all processes to agree; only what it writes should depend on
`state.is_main_process`. A callback with `state_dict()` and `load_state_dict()` is saved in every checkpoint and
continues on resume.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

@dataclass
class TrainerState:
    """The run so far, as callbacks and the end-of-run summary see it. A checkpoint keeps it, so that after a resume
    it covers the whole run, not only this session."""

    total_steps: int
    tokens_per_step: int
    is_main_process: bool = True
    step: int = 0
    session_start_step: int = 0  # where this session began: 0, or the step it resumed from
    latest: dict[str, float] = field(default_factory=dict)  # the latest logged value of every key
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    timed_tokens: int = 0  # tokens and seconds of the timed steps (first steps, evals and saves excluded)
    timed_seconds: float = 0.0
    seconds_before_session: float = 0.0
    session_started: float = field(default_factory=time.perf_counter)
    stopped_by: str | None = None  # what stopped the run early: a signal's name, or a callback's class name
    skipped_steps: list[int] = field(default_factory=list)  # steps whose loss or grad norm was not finite
    # Each eval value's best so far and its step: the lowest of a loss, the highest of an accuracy.
    best: dict[str, tuple[float, int]] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.step * self.tokens_per_step

    @property
    def session_seconds(self) -> float:
        return time.perf_counter() - self.session_started

    @property
    def elapsed_seconds(self) -> float:
        """The whole run's time, evals and saves included: earlier sessions up to their checkpoint, then this one."""
        return self.seconds_before_session + self.session_seconds

    def observe(self, values: dict[str, float]) -> None:
        self.latest.update(values)
        loss = values.get("eval_loss")
        if loss is not None and (self.best_eval_loss is None or loss < self.best_eval_loss):
            self.best_eval_loss, self.best_eval_step = loss, self.step
        for key, value in values.items():
            if not key.startswith("eval_") or not isinstance(value, (int, float)) or value != value:
                continue
            lower_is_better = key.endswith("_loss")
            best = self.best.get(key)
            if best is None or (value < best[0] if lower_is_better else value > best[0]):
                self.best[key] = (float(value), self.step)

    def add_timing(self, tokens: int, seconds: float) -> None:
        self.timed_tokens += tokens
        self.timed_seconds += seconds

    def state_dict(self) -> dict[str, Any]:
        return {"latest": self.latest, "best_eval_loss": self.best_eval_loss, "best_eval_step": self.best_eval_step,
                "timed_tokens": self.timed_tokens, "timed_seconds": self.timed_seconds,
                "elapsed_seconds": self.elapsed_seconds, "skipped_steps": self.skipped_steps,
                "best": {key: list(value) for key, value in self.best.items()}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.latest = dict(saved.get("latest", {}))
        self.best_eval_loss, self.best_eval_step = saved.get("best_eval_loss"), saved.get("best_eval_step")
        self.timed_tokens, self.timed_seconds = saved.get("timed_tokens", 0), saved.get("timed_seconds", 0.0)
        self.seconds_before_session = saved.get("elapsed_seconds", 0.0)
        self.skipped_steps = list(saved.get("skipped_steps", []))
        self.best = {key: (float(value), int(step)) for key, (value, step) in saved.get("best", {}).items()}


@dataclass
class TrainerControl:
    """What callbacks ask of the loop; it acts before the next step, then clears should_save and should_evaluate."""

    should_training_stop: bool = False  # save a checkpoint (and main/) and end the run; resumable
    should_save: bool = False
    should_evaluate: bool = False


class TrainerCallback:
    """Override the events you need; each gets the arguments, the state and the control (see the module doc)."""

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, *, logs: dict[str, float],
               **kwargs: Any) -> None:
        pass

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, *, metrics: dict[str, float],
                    **kwargs: Any) -> None:
        pass

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, *, checkpoint: Path,
                **kwargs: Any) -> None:
        pass

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        pass

    def on_error(self, args: Any, state: TrainerState, control: TrainerControl, *, error: BaseException,
                 **kwargs: Any) -> None:
        pass


class CallbackHandler:
    """Fires each event on the callbacks in their order, and names the callback that first asks for a stop."""

    def __init__(self, callbacks: list[TrainerCallback]):
        self.callbacks = callbacks

    def fire(self, event: str, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        for callback in self.callbacks:
            stopping = control.should_training_stop
            getattr(callback, event)(args, state, control, **kwargs)
            if control.should_training_stop and not stopping and state.stopped_by is None:
                state.stopped_by = type(callback).__name__

    def _keys(self) -> list[str]:
        # Class names, numbered from the second of a kind: what a checkpoint files each callback's state under.
        seen: dict[str, int] = {}
        keys = []
        for callback in self.callbacks:
            name = type(callback).__name__
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}.{seen[name]}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        return {key: callback.state_dict() for key, callback in zip(self._keys(), self.callbacks)
                if hasattr(callback, "state_dict")}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for key, callback in zip(self._keys(), self.callbacks):
            if key in saved and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(saved[key])


class EarlyStopping(TrainerCallback):
    """Stops the run once `metric` (lower is better) has not improved by more than `min_delta` for `patience`
    evaluations in a row. The run saves a checkpoint and main/ as it stops; its counts continue on resume."""

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "eval_loss"):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}.")
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.best: float | None = None
        self.evals_without_improvement = 0

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, *, metrics: dict[str, float],
                    **kwargs: Any) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.evals_without_improvement = value, 0
            return
        self.evals_without_improvement += 1
        if self.evals_without_improvement >= self.patience:
            logger.warning("Early stopping at step %d: %s has not improved on %.4f by more than %g for %d "
                           "evaluations.", state.step, self.metric, self.best, self.min_delta, self.patience)
            control.should_training_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "evals_without_improvement": self.evals_without_improvement}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.best, self.evals_without_improvement = saved["best"], saved["evals_without_improvement"]


class ProgressBar(TrainerCallback):
    """The main process's progress bar, in steps, with the latest train loss."""

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.bar = tqdm(total=state.total_steps, initial=state.step, disable=not state.is_main_process, unit="step")

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.bar.update()

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, *, logs: dict[str, float],
               **kwargs: Any) -> None:
        if "train_loss" in logs:
            self.bar.set_postfix(loss=f"{logs['train_loss']:.4f}")

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.bar.close()

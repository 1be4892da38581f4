"""When the loop logs, evaluates, saves and stops: pure functions of the step, the intervals and the callbacks'
flags. The Trainer asks them at each step boundary; the rules live here alone.

A boundary is the point before training step `step + 1` (or, at the last step, the end). At a boundary the loop
may evaluate, then save: a checkpoint then holds the evaluated state, and a run resumed from it continues from the
same boundary without saving it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def every(step: int, interval: int) -> bool:
    """Whether `step` falls on `interval` (0: never)."""
    return interval > 0 and step % interval == 0


def log_due(step: int, total_steps: int, log_every_steps: int) -> bool:
    """Whether the train values are logged after `step`: on the interval and after the last step."""
    return every(step, log_every_steps) or step == total_steps


@dataclass(frozen=True)
class Boundary:
    """Where the loop stands: `step` steps done; `last` when that is all of them; `resumed` when the run resumed
    here, from a checkpoint of this very step."""

    step: int
    last: bool
    resumed: bool


def signals_due(at: Boundary, *, eval_every_steps: int, save_every_steps: int, control: Any) -> bool:
    """Whether the last step's signals (StepSignals) must be read now rather than a step late: before anything is
    evaluated or saved, so that a step that went bad stops the run before it is saved."""
    return (at.last or every(at.step, save_every_steps) or every(at.step, eval_every_steps)
            or control.should_save or control.should_evaluate or control.should_training_stop)


def evaluation_due(at: Boundary, *, has_eval: bool, eval_pending: bool, preempted: bool, eval_every_steps: int,
                   control: Any) -> tuple[bool, bool]:
    """(evaluate now, an evaluation is scheduled here). A resumed boundary evaluates only if its checkpoint says
    the evaluation was still pending; after a stop signal there is no time for a scheduled one (the checkpoint
    then records it as pending), but a callback's request is honoured."""
    if not has_eval:
        return False, False
    scheduled = eval_pending if at.resumed else at.last or every(at.step, eval_every_steps)
    hurried = preempted and not at.last
    return scheduled and not hurried or control.should_evaluate, scheduled


def save_due(at: Boundary, *, preempted: bool, save_every_steps: int, control: Any) -> tuple[bool, bool]:
    """(save now, final: main/ too). Asked after the evaluation, whose callbacks may stop the run. The resumed
    boundary is saved already; a stopped run saves where it stops, and writes main/ unless a signal stopped it
    early."""
    scheduled = not at.resumed and (at.last or at.step > 0 and every(at.step, save_every_steps))
    save = scheduled or control.should_save or control.should_training_stop
    return save, at.last or not preempted and control.should_training_stop


def total_steps(loop: Any, data: Any, loader: Any) -> int:
    """Optimizer steps to run: --max_train_steps, else --max_train_tokens, else --num_train_epochs passes over the
    data (a loader's length is one pass). The default loaders repeat the data as often as that takes. `loop` and
    `data` are those groups of the arguments."""
    per_epoch = len(loader) / data.gradient_accumulation_steps if hasattr(loader, "__len__") else None
    if loop.max_train_steps:
        steps = loop.max_train_steps
    elif loop.max_train_tokens:
        steps = loop.max_train_tokens // data.tokens_per_step
    elif per_epoch is None:
        raise ValueError("The train loader has no length: give --max_train_steps or --max_train_tokens.")
    else:
        steps = math.floor(loop.num_train_epochs * per_epoch + 1e-9)  # 1e-9: 0.29 × 100 is 28.99999...
    if getattr(loader, "repeat", True) is False and per_epoch is not None and steps > per_epoch:
        raise ValueError(f"{steps} steps need more than the one pass over the data ({int(per_epoch)} steps) that "
                         f"the train loader makes: build it with repeat=True.")
    if steps < 1:
        raise ValueError(f"Less than one step of training: a step takes {data.tokens_per_step} tokens "
                         f"(--train_batch_size {data.train_batch_size} × --block_size {data.block_size}).")
    return steps

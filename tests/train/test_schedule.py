"""The loop's schedule, rule by rule: when it logs, evaluates, saves and writes main/ (timl/train/schedule.py). The
runs in test_trainer.py and test_checkpoint.py check the same rules end to end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from timl.train.callbacks import TrainerControl
from timl.train.schedule import Boundary, evaluation_due, log_due, save_due, signals_due, total_steps


def control(**flags) -> TrainerControl:
    value = TrainerControl()
    for name, flag in flags.items():
        setattr(value, name, flag)
    return value


def evaluation(at: Boundary, *, eval_pending=False, preempted=False, has_eval=True, **flags):
    return evaluation_due(at, has_eval=has_eval, eval_pending=eval_pending, preempted=preempted,
                          eval_every_steps=10, control=control(**flags))


def save(at: Boundary, *, preempted=False, **flags):
    return save_due(at, preempted=preempted, save_every_steps=20, control=control(**flags))


def test_logs_on_the_interval_and_after_the_last_step():
    assert [step for step in range(1, 26) if log_due(step, 25, 10)] == [10, 20, 25]
    assert [step for step in range(1, 4) if log_due(step, 3, 0)] == [3]


def test_evaluates_at_step_0_on_the_interval_and_at_the_end():
    due = [step for step in range(0, 26) if evaluation(Boundary(step, step == 25, False))[0]]
    assert due == [0, 10, 20, 25]
    assert evaluation(Boundary(10, False, False), has_eval=False) == (False, False)


def test_saves_on_the_interval_and_at_the_end_never_at_step_0_and_main_only_at_the_end():
    assert [step for step in range(0, 46) if save(Boundary(step, step == 45, False))[0]] == [20, 40, 45]
    assert save(Boundary(20, False, False)) == (True, False)
    assert save(Boundary(45, True, False)) == (True, True)


def test_the_boundary_a_run_resumed_at_is_not_saved_again_and_evaluates_only_if_pending():
    resumed = Boundary(20, False, True)
    assert save(resumed) == (False, False)
    assert evaluation(resumed) == (False, False)
    assert evaluation(resumed, eval_pending=True) == (True, True)


def test_after_a_stop_signal_the_scheduled_evaluation_waits_and_the_checkpoint_is_not_final():
    at = Boundary(10, False, False)
    assert evaluation(at, preempted=True) == (False, True)  # scheduled, not run: recorded as pending
    assert evaluation(at, preempted=True, should_evaluate=True) == (True, True)  # a callback's request is honoured
    assert save(at, preempted=True, should_training_stop=True) == (True, False)  # saved where it stops, no main/
    assert evaluation(Boundary(25, True, False), preempted=True) == (True, True)  # the last step still evaluates


def test_a_callback_that_stops_the_run_gets_a_final_save_and_its_requests_are_honoured():
    at = Boundary(13, False, False)
    assert save(at, should_training_stop=True) == (True, True)  # early stopping: a checkpoint and main/
    assert save(at, should_save=True) == (True, False)
    assert evaluation(at, should_evaluate=True) == (True, False)


def test_signals_are_read_at_once_before_anything_is_evaluated_or_saved():
    def due(step, last=False, **flags):
        return signals_due(Boundary(step, last, False), eval_every_steps=10, save_every_steps=20,
                           control=control(**flags))

    assert [step for step in range(1, 25) if due(step)] == [10, 20]
    assert due(7, last=True) and due(7, should_save=True) and due(7, should_training_stop=True)


def test_total_steps_come_from_steps_tokens_or_epochs():
    data = SimpleNamespace(gradient_accumulation_steps=2, tokens_per_step=64, train_batch_size=4, block_size=16)
    loader = [None] * 20  # 20 micro-batches a pass: 10 steps an epoch

    def loop(**values):
        return SimpleNamespace(**{"max_train_steps": None, "max_train_tokens": None, "num_train_epochs": 1.0,
                                  **values})

    assert total_steps(loop(max_train_steps=7), data, loader) == 7
    assert total_steps(loop(max_train_tokens=64 * 5 + 63), data, loader) == 5
    assert total_steps(loop(num_train_epochs=2.5), data, loader) == 25
    with pytest.raises(ValueError, match="Less than one step"):
        total_steps(loop(max_train_tokens=63), data, loader)

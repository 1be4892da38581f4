"""The built-in metrics on hand-made logits whose answers are known, to the last digit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from timl.loss.cross_entropy import IGNORE_INDEX
from timl.report.metrics import Accuracy, CrossEntropy, Metric, Perplexity, report


class OneProcess:
    """What a metric needs of an Accelerator, for one process: summing over the processes changes nothing."""

    device = torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return tensor


def batch(logits: list[list[float]], labels: list[int]) -> tuple[SimpleNamespace, dict[str, torch.Tensor]]:
    """One sequence: the model's outputs (logits [1, tokens, vocab]) and the inputs (labels [1, tokens])."""
    return SimpleNamespace(logits=torch.tensor([logits])), {"labels": torch.tensor([labels])}


# The most likely ids are 1, 0, 2, 1 and the labels 1, 0, 2, 0: three of four right. The fifth position is wrong
# too, but its label is ignored.
LOGITS = [[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 4.0, 0.0], [9.0, 0.0, 0.0]]
LABELS = [1, 0, 2, 0, IGNORE_INDEX]


def test_accuracy_is_the_share_of_labelled_tokens_predicted_right():
    accuracy = Accuracy()
    accuracy.update(*batch(LOGITS, LABELS))
    assert accuracy.to_dict() == {"accuracy": 0.75}
    accuracy.update(*batch([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], [1, 2]))  # one more right, one more wrong
    assert accuracy.to_dict() == {"accuracy": 4 / 6}


def test_cross_entropy_and_perplexity_match_a_hand_computation():
    # Uniform logits over 4 ids give -log(1/4); logits (log 2, 0, 0, 0) give the first id 2/5, so -log(2/5).
    logits, labels = [[0.0, 0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]], [3, 0, IGNORE_INDEX]
    loss, perplexity = CrossEntropy(), Perplexity()
    for metric in (loss, perplexity):
        metric.update(*batch(logits, labels))
    assert loss.to_dict()["loss"] == pytest.approx((math.log(4) + math.log(5 / 2)) / 2, rel=1e-6)
    assert perplexity.to_dict()["perplexity"] == pytest.approx(math.sqrt(4 * 5 / 2), rel=1e-6)


def test_report_gathers_prefixes_and_resets():
    accuracy, loss = Accuracy(), CrossEntropy()
    assert isinstance(accuracy, Metric) and isinstance(loss, Metric)
    for metric in (accuracy, loss):
        metric.update(*batch(LOGITS, LABELS))
    values = report([accuracy, loss], OneProcess(), "eval_")
    assert sorted(values) == ["eval_accuracy", "eval_loss"] and values["eval_accuracy"] == 0.75
    accuracy.update(*batch([[0.0, 1.0]], [0]))  # after the reset, only this wrong prediction counts
    assert accuracy.to_dict() == {"accuracy": 0.0}

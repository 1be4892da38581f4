"""Exact token-weighted losses: micro-batches and ranks holding very different numbers of labels give the loss, and
the gradients, of one forward over the whole global batch; the z-loss reaches the gradients on every loss path."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_GPT2, read_metrics
from timl.config import ModelArguments
from timl.train.pretrain import make_model, pretrain
from timl.train.trainer import Trainer
from uneven_batches import GradientRecorder, UnevenLoader, micro_batch_mean_loss, token_mean_loss, train_args

ROOT = Path(__file__).resolve().parents[2]


def independent_losses(args) -> tuple[float, float]:
    """The initial model's mean loss over every labelled token of the first step, in one forward; and the mean of
    its per-micro-batch means, which a test must be able to tell apart from it."""
    model = make_model(ModelArguments(config_overrides=TINY_GPT2), args)
    with torch.no_grad():
        token_mean, mean_of_means = token_mean_loss(model).item(), token_mean_loss(model, rows_per_mean=2).item()
    assert abs(mean_of_means - token_mean) > 1e-3 * token_mean
    return token_mean, mean_of_means


def first_step(output_dir: Path) -> dict[str, float]:
    [record] = [record for record in read_metrics(output_dir) if "train_loss" in record]
    assert record["step"] == 1
    return record


@pytest.mark.parametrize("loss", ["default", "micro_batch_mean", "chunked"])
def test_micro_batches_with_uneven_label_counts_log_the_token_mean_of_the_step(tmp_path, loss):
    """Four micro-batches of two sequences hold 17, 5, 29 and 6 labels. A user's micro-batch mean weighs in by its
    labelled tokens, not by its positions. `chunked` is the GPU's default loss path, here on the CPU."""
    args = train_args(tmp_path / "run", loss_implementation="chunked" if loss == "chunked" else "auto")
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args, train_loader_factory=UnevenLoader,
             compute_loss_func=micro_batch_mean_loss if loss == "micro_batch_mean" else None)
    expected, _ = independent_losses(args)
    assert first_step(tmp_path / "run")["train_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("path", ["auto", "chunked"])
def test_two_ranks_with_uneven_label_counts_log_the_token_mean_of_the_step(tmp_path, path):
    """Two processes over gloo, each with two micro-batches: rank 0 holds 46 labels, rank 1 11. `chunked` is the
    GPU's default loss path, here under DDP on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "workers" / "uneven_batches.py"), str(tmp_path), path], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, _ = independent_losses(train_args(tmp_path / "reference"))  # tmp_path now holds the run
    assert first_step(tmp_path)["train_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("path", ["full", "chunked", "logits"])
def test_the_z_loss_reaches_the_gradients_on_every_loss_path(tmp_path, path):
    """The step's gradient equals autograd's of the one-forward token mean of cross-entropy + c × logsumexp², on
    micro-batches of uneven label counts; and the z-loss moves it far more than the tolerance."""
    coefficient = 0.5
    args = train_args(tmp_path / "run", loss_implementation=path, z_loss_coefficient=coefficient, max_grad_norm=0.0)
    model = make_model(ModelArguments(config_overrides=TINY_GPT2), args)
    reference = copy.deepcopy(model)
    recorder = GradientRecorder(model.parameters(), lr=0.0)
    trainer = Trainer(model, args, train_loader_factory=UnevenLoader, optimizers=(recorder, None))
    trainer.train()
    assert trainer.training_loss.path == path

    parameters = list(reference.parameters())
    cross_entropy = token_mean_loss(reference)
    with_z_loss = token_mean_loss(reference, z_loss_coefficient=coefficient)
    without = torch.autograd.grad(cross_entropy, parameters)
    expected = torch.autograd.grad(with_z_loss, parameters)
    logged = first_step(tmp_path / "run")
    assert logged["train_loss"] == pytest.approx(cross_entropy.item(), rel=1e-6)
    assert logged["train_z_loss"] == pytest.approx((with_z_loss - cross_entropy).item(), rel=1e-5)
    # The training step comes first; saving adds a step on zero gradients (DCP's way to fill a stateless optimizer).
    gradients = recorder.steps[0]
    assert len(gradients) == len(expected)
    for got, want in zip(gradients, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    z_part = torch.cat([(want - plain).flatten() for want, plain in zip(expected, without)])
    assert z_part.norm() > 0.1 * torch.cat([want.flatten() for want in expected]).norm()

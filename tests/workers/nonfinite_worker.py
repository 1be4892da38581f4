"""A training process for the non-finite tests, launched under torchrun or run in-process: a tiny GPT-2 whose loss is
NaN on one rank at one step, as a bad batch makes it.

  nonfinite_worker.py DATA_DIR OUTPUT_DIR BAD_RANK BAD_STEP SKIP_NONFINITE_STEPS
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

# Run as a script, this folder alone is on the path; the tests' shared helpers live one up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_GPT2  # noqa: E402
from timl.config import ModelArguments, TrainingArguments
from timl.loss.cross_entropy import next_token_loss
from timl.train.pretrain import pretrain, recipe_process


class NaNAtStep:
    """The default loss, NaN in every micro-batch of optimizer step `bad_step` (from 1) on rank `bad_rank`."""

    def __init__(self, bad_rank: int, bad_step: int, micro_batches: int):
        self.bad_rank, self.bad_step, self.micro_batches, self.calls = bad_rank, bad_step, micro_batches, 0

    def __call__(self, outputs: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor):
        step = self.calls // self.micro_batches + 1
        self.calls += 1
        loss = next_token_loss(outputs, inputs, num_items_in_batch)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return loss * float("nan") if (rank, step) == (self.bad_rank, self.bad_step) else loss


def arguments(data_dir: Path, output_dir: Path, **overrides: Any) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), train_file_pattern=str(data_dir / "train_*.bin"), block_size=16,
                  train_batch_size=8, per_device_train_batch_size=2, max_train_steps=5, log_every_steps=1,
                  eval_every_steps=0, save_every_steps=1, report_to="none", optim="adamw_torch", learning_rate=1e-2)
    return TrainingArguments(**{**values, **overrides})


def train(data_dir: Path, output_dir: Path, bad_rank: int, bad_step: int, skip: int, **overrides: Any):
    args = arguments(data_dir, output_dir, skip_nonfinite_steps=skip, **overrides)
    loss = NaNAtStep(bad_rank, bad_step, args.gradient_accumulation_steps)
    return pretrain(ModelArguments(config_overrides=TINY_GPT2), args, compute_loss_func=loss)


if __name__ == "__main__":
    data, output, rank, step, skip = sys.argv[1:6]
    with recipe_process():
        train(Path(data), Path(output), int(rank), int(step), int(skip))

"""Batches whose sequences carry very different numbers of labels, for the tests of exact token-weighted means; an
optimizer that keeps the gradients it is given; and a training process for those tests to launch under torchrun:

  uneven_batches.py OUTPUT_DIR
      Trains one step on the uneven batches with the default loss, logging its train loss to OUTPUT_DIR/metrics.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BLOCK, VOCAB, ROWS = 16, 64, 8
# Labelled positions in each of a step's 8 sequences. Micro-batches of 2 rows hold 17, 5, 29 and 6 labels; with two
# processes, rank 0 holds 46 and rank 1 11. A mean of per-micro-batch (or per-rank) means is far from the token mean.
LABELLED = (16, 1, 2, 3, 15, 14, 5, 1)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input ids and labels [ROWS, BLOCK] of optimizer step `step` (from 0); row i has LABELLED[i] labels, at
    random positions, and -100 elsewhere."""
    generator = torch.Generator().manual_seed(step)
    input_ids = torch.randint(0, VOCAB, (ROWS, BLOCK), generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS, BLOCK), generator=generator)
    order = torch.rand(ROWS, BLOCK, generator=generator).argsort(dim=1).argsort(dim=1)  # each row's positions, shuffled
    labels[order >= torch.tensor(LABELLED)[:, None]] = -100
    return input_ids, labels


class UnevenLoader:
    """A train loader factory and BatchLoader over global_batch: micro-batch m of a step on rank r holds rows
    [(m × world size + r) × per-device batch, ...) of the step's global batch."""

    def __init__(self, args: Any, accelerator: Any):
        assert args.train_batch_size == ROWS and args.block_size == BLOCK
        self.per_device, self.micro_batches = args.per_device_train_batch_size, args.gradient_accumulation_steps
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.position = 0  # micro-batches served on this rank

    def __iter__(self):
        while True:
            step, micro_batch = divmod(self.position, self.micro_batches)
            input_ids, labels = global_batch(step)
            start = (micro_batch * self.world_size + self.rank) * self.per_device
            self.position += 1
            yield {"input_ids": input_ids[start:start + self.per_device].to(self.device),
                   "labels": labels[start:start + self.per_device].to(self.device)}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def micro_batch_mean_loss(outputs: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A user's loss of the two-argument kind: the mean over this micro-batch's labelled tokens."""
    return F.cross_entropy(outputs.logits.flatten(0, 1).float(), inputs["labels"].flatten(), ignore_index=-100)


class GradientRecorder(torch.optim.SGD):
    """SGD that keeps the gradients of each step, as the trainer hands them over (accumulated, clipped); with lr 0 it
    leaves the model as it was."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.steps.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def token_mean_loss(model: torch.nn.Module, step: int = 0, z_loss_coefficient: float = 0.0,
                    rows_per_mean: int = ROWS) -> torch.Tensor:
    """The independent loss of the step: cross-entropy (plus coefficient × logsumexp², over the same tokens) averaged
    over every labelled token of the global batch, in one forward. With rows_per_mean < ROWS, instead the mean of
    the means of groups of that many rows: what a per-micro-batch average would give, to show that it differs."""
    input_ids, labels = global_batch(step)
    logits = model(input_ids=input_ids).logits.float()
    means = []
    for start in range(0, ROWS, rows_per_mean):
        rows = slice(start, start + rows_per_mean)
        group_logits, group_labels = logits[rows].flatten(0, 1), labels[rows].flatten()
        labelled = group_labels != -100
        cross_entropy = F.cross_entropy(group_logits, group_labels, ignore_index=-100)
        z_loss = (torch.logsumexp(group_logits, dim=-1).square() * labelled).sum() / labelled.sum()
        means.append(cross_entropy + z_loss_coefficient * z_loss)
    return torch.stack(means).mean()


def train_args(output_dir: Path, **overrides: Any):
    from timl.config import TrainingArguments

    values = dict(output_dir=str(output_dir), block_size=BLOCK, train_batch_size=ROWS, per_device_train_batch_size=2,
                  max_train_steps=1, log_every_steps=1, eval_every_steps=0, save_every_steps=0, report_to="none",
                  optim="adamw_torch", learning_rate=1e-3)
    return TrainingArguments(**{**values, **overrides})


def main(output_dir: Path, loss_implementation: str) -> None:
    from conftest import TINY_GPT2
    from timl.config import ModelArguments
    from timl.train.pretrain import pretrain

    args = train_args(output_dir, loss_implementation=loss_implementation)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args, train_loader_factory=UnevenLoader)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "auto")

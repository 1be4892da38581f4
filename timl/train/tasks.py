"""Downstream multiple-choice tasks in the evaluation loop (--eval_tasks): accuracy as lm-evaluation-harness
defines `acc` and `acc_norm`.

A task is a local JSON-lines file, one item a line: {"context": "...", "choices": ["...", ...], "label": i}. Each
choice is scored by the log-likelihood the model gives it as a continuation of the context, `" " + choice` after the
context (lm-evaluation-harness's default target delimiter), tokenized with the run's tokenizer: the context and the
whole are encoded, and the continuation is what the whole adds. `acc` takes the choice of the highest
log-likelihood; `acc_norm` divides each by the choice's length in characters first. Every process scores its share
of the items, and the counts are summed over processes, so the means are exact on any world size. The choices go
through the module training runs (compiled when training is, wrapped by DDP or FSDP) a batch of rows at a time,
every process running the same number of forwards.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from timl.loss.cross_entropy import IGNORE_INDEX, token_losses
from timl.report.metrics import CrossEntropy

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class TaskItem:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    items: tuple[TaskItem, ...]


def parse_task_list(value: str) -> list[tuple[str, str]]:
    """--eval_tasks "hellaswag.jsonl,arc=data/arc_easy.jsonl" as (name, path) pairs: the name is the file's stem,
    or what precedes '='."""
    pairs = []
    for entry in (part.strip() for part in value.split(",")):
        if entry:
            name, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).stem, "", entry)
            pairs.append((name.strip(), path.strip()))
    return pairs


def read_task(name: str, path: str | Path, max_items: int | None = None) -> Task:
    """The items of a task file (the first `max_items`), or a ValueError naming the file and line of the first that
    is malformed."""
    items = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                context, choices, label = record["context"], record["choices"], record["label"]
                if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2 or not all(
                        isinstance(choice, str) for choice in choices):
                    raise ValueError("context must be text and choices a list of two or more texts")
                if not isinstance(label, int) or not 0 <= label < len(choices):
                    raise ValueError(f"label must index the choices (0 to {len(choices) - 1}), got {label!r}")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                reason = f"missing {error}" if isinstance(error, KeyError) else str(error)
                raise ValueError(f"{path}:{number}: not a task item ({reason}); each line is "
                                 f'{{"context": "...", "choices": ["...", ...], "label": <index>}}') from None
            items.append(TaskItem(context, tuple(choices), label))
            if max_items is not None and len(items) == max_items:
                break
    if not items:
        raise ValueError(f"{path}: no task items")
    return Task(name, tuple(items))


def choice_tokens(tokenizer: Any, context: str, choice: str, block_size: int) -> tuple[list[int], int]:
    """The tokens of context + delimiter + choice (the last `block_size` + 1 of them) and how many at the end are
    the continuation's."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + TARGET_DELIMITER + choice, add_special_tokens=False)["input_ids"]
    continuation = max(1, len(whole) - len(context_ids))
    return whole[-(block_size + 1):], min(continuation, block_size)


@dataclass(frozen=True)
class ChoiceRow:
    """One choice of one item as a row to score: its tokens and how many at the end are the continuation."""

    item: int  # the item's index in the task
    tokens: tuple[int, ...]
    continuation: int


def process_items(task: Task, rank: int, world_size: int) -> range:
    """The indices of the items this process scores: every world_size-th."""
    return range(rank, len(task.items), world_size)


def batches_per_process(task: Task, world_size: int, rows_per_batch: int) -> int:
    """How many batches the busiest process scores; every process runs that many forwards (padding with empty
    ones), so that FSDP's collectives inside each forward line up across processes."""
    return max((math.ceil(sum(len(task.items[index].choices) for index in process_items(task, rank, world_size))
                          / rows_per_batch) for rank in range(world_size)), default=0)


def row_length(rows: list[ChoiceRow], block_size: int) -> int:
    """A batch's length: its longest input rounded up to a power of two from 64, at most block_size, so that a
    compiled forward sees a handful of shapes."""
    longest = max((len(row.tokens) - 1 for row in rows), default=1)
    return min(block_size, max(64, 1 << (longest - 1).bit_length()))


def choice_batch(rows: list[ChoiceRow], rows_per_batch: int, block_size: int) -> dict[str, torch.Tensor]:
    """input_ids and labels [rows_per_batch, length] for these rows (the rest empty): each row's tokens, padded
    after its end (causal, so unseen), and labels only on its continuation, where position p predicts token p + 1."""
    length = row_length(rows, block_size)
    input_ids = torch.zeros(rows_per_batch, length, dtype=torch.long)
    labels = torch.full((rows_per_batch, length), IGNORE_INDEX, dtype=torch.long)
    for index, row in enumerate(rows):
        end = len(row.tokens) - 1
        input_ids[index, :end] = torch.tensor(row.tokens[:-1])
        labels[index, end - row.continuation:end] = torch.tensor(row.tokens[end - row.continuation + 1:])
    return {"input_ids": input_ids, "labels": labels}


class ChoiceLogLikelihoods(CrossEntropy):
    """Keeps the cross-entropy of each token of the last batch scored (0 where unlabelled), from which the caller
    sums each row. A CrossEntropy, so that the training forward's evaluation path (timl.model.forward) hands it the
    whole batch's token losses, from the chunked head or from the model's logits, as it hands the eval loss."""

    def update(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> None:
        labels = inputs["labels"].flatten()
        self.add(token_losses(outputs.logits.flatten(0, -2).float(), labels)[0], labels)

    def add(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        self.token_losses = torch.where(labels.flatten() != IGNORE_INDEX, values.flatten().float(), 0.0)


ScoreBatch = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""Given a batch of choice rows (input_ids, labels), the summed log-likelihood of each row's labelled tokens."""


def score_task(score_batch: ScoreBatch, tokenizer: Any, task: Task, *, rank: int, world_size: int,
               device: torch.device, block_size: int, rows_per_batch: int) -> torch.Tensor:
    """This process's [correct by acc, correct by acc_norm, items] over its share of the task's items, as a device
    tensor to be summed over processes. The choices of its items go through `score_batch` `rows_per_batch` rows
    at a time, in as many batches as the busiest process's (batches_per_process)."""
    rows = [ChoiceRow(index, tuple(tokens), continuation) for index in process_items(task, rank, world_size)
            for tokens, continuation in (choice_tokens(tokenizer, task.items[index].context, choice, block_size)
                                         for choice in task.items[index].choices)]
    scores: list[torch.Tensor] = []
    for start in range(0, batches_per_process(task, world_size, rows_per_batch) * rows_per_batch, rows_per_batch):
        batch = rows[start:start + rows_per_batch]
        inputs = {name: tensor.to(device) for name, tensor in choice_batch(batch, rows_per_batch, block_size).items()}
        scores.append(score_batch(inputs)[:len(batch)].float())
    by_row = torch.cat(scores).tolist() if scores else []
    counts = torch.zeros(3, device=device)
    position = 0
    for index in process_items(task, rank, world_size):
        item = task.items[index]
        choice_scores = by_row[position:position + len(item.choices)]
        position += len(item.choices)
        normalized = [score / max(len(choice), 1) for score, choice in zip(choice_scores, item.choices)]
        counts += torch.tensor([float(_argmax(choice_scores) == item.label),
                                float(_argmax(normalized) == item.label), 1.0], device=device)
    return counts


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda index: (values[index], -index))


def task_values(name: str, counts: torch.Tensor) -> dict[str, float]:
    """eval_<name>_acc and eval_<name>_acc_norm from the summed counts."""
    correct, correct_norm, items = counts.tolist()
    if not items:
        return {f"eval_{name}_acc": math.nan, f"eval_{name}_acc_norm": math.nan}
    return {f"eval_{name}_acc": correct / items, f"eval_{name}_acc_norm": correct_norm / items}

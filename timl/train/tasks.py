"""Downstream multiple-choice tasks in the evaluation loop (--eval_tasks): accuracy as lm-evaluation-harness
defines `acc` and `acc_norm`.

A task is a local JSON-lines file, one item a line: {"context": "...", "choices": ["...", ...], "label": i}. Each
choice is scored by the log-likelihood the model gives it as a continuation of the context, `" " + choice` after the
context (lm-evaluation-harness's default target delimiter), tokenized with the run's tokenizer: the context and the
whole are encoded, and the continuation is what the whole adds. `acc` takes the choice of the highest
log-likelihood; `acc_norm` divides each by the choice's length in characters first. Every process scores its share
of the items, and the counts are summed over processes, so the means are exact on any world size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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


@torch.no_grad()
def choice_log_likelihoods(model: torch.nn.Module, tokenizer: Any, item: TaskItem, *, device: torch.device,
                           block_size: int) -> list[float]:
    """The log-likelihood the model gives each choice as the context's continuation, all choices in one batch."""
    encoded = [choice_tokens(tokenizer, item.context, choice, block_size) for choice in item.choices]
    length = max(len(tokens) for tokens, _ in encoded) - 1
    input_ids = torch.zeros(len(encoded), length, dtype=torch.long)
    for row, (tokens, _) in enumerate(encoded):
        input_ids[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])  # padded after its end: causal, so unseen
    logits = model(input_ids=input_ids.to(device)).logits.float()
    scores = []
    for row, (tokens, continuation) in enumerate(encoded):
        end = len(tokens) - 1  # position p predicts tokens[p + 1]
        targets = torch.tensor(tokens[end - continuation + 1:end + 1], device=device)
        log_probs = F.log_softmax(logits[row, end - continuation:end], dim=-1)
        scores.append(log_probs.gather(1, targets[:, None]).sum().item())
    return scores


def score_task(model: torch.nn.Module, tokenizer: Any, task: Task, *, rank: int, world_size: int,
               device: torch.device, block_size: int) -> torch.Tensor:
    """This process's [correct by acc, correct by acc_norm, items] over its share of the task's items (every
    world_size-th), as a device tensor, to be summed over processes."""
    counts = torch.zeros(3, device=device)
    for item in task.items[rank::world_size]:
        scores = choice_log_likelihoods(model, tokenizer, item, device=device, block_size=block_size)
        normalized = [score / max(len(choice), 1) for score, choice in zip(scores, item.choices)]
        counts += torch.tensor([float(_argmax(scores) == item.label), float(_argmax(normalized) == item.label), 1.0],
                               device=device)
    return counts


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda index: (values[index], -index))


def task_values(name: str, counts: torch.Tensor) -> dict[str, float]:
    """eval_<name>_acc and eval_<name>_acc_norm from the summed counts."""
    correct, correct_norm, items = counts.tolist()
    if not items:
        return {f"eval_{name}_acc": math.nan, f"eval_{name}_acc_norm": math.nan}
    return {f"eval_{name}_acc": correct / items, f"eval_{name}_acc_norm": correct_norm / items}

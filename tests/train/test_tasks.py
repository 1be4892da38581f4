"""--eval_tasks: multiple-choice accuracy in the evaluation loop, as lm-evaluation-harness defines acc and acc_norm,
checked against an independent computation with transformers on the saved main/."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_GPT2, read_metrics, tiny_tokenizer_folder, write_learnable_shards
from timl.config import ModelArguments, TrainingArguments
from timl.train.pretrain import pretrain
from timl.train.tasks import (ChoiceRow, Task, TaskItem, batches_per_process, choice_batch, choice_tokens,
                              parse_task_list, read_task, score_task)
from timl.train.trainer import Trainer

ITEMS = [
    {"context": "w3 w4 w5", "choices": ["w6", "w9 w9", "w2"], "label": 0},
    {"context": "w10 w11", "choices": ["w12 w13 w14", "w40"], "label": 1},
    {"context": "w20", "choices": ["w21", "w22", "w23 w24", "w25"], "label": 2},
    {"context": "w30 w31 w32 w33", "choices": ["w34", "w35 w36"], "label": 0},
    {"context": "w50 w51", "choices": ["w52 w53", "w54", "w55"], "label": 1},
]


def write_task(path, items) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def independent_scores(main, item) -> list[float]:
    """Each choice's log-likelihood as the context's continuation, computed here with transformers alone."""
    tokenizer = AutoTokenizer.from_pretrained(main)
    model = AutoModelForCausalLM.from_pretrained(main).eval()
    scores = []
    for choice in item["choices"]:
        context = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(item["context"] + " " + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
        scores.append(sum(log_probs[position - 1, whole[position]].item()
                          for position in range(len(context), len(whole))))
    return scores


def independent_accuracies(main, items) -> tuple[float, float]:
    """acc and acc_norm from their definitions, over independent_scores."""
    correct = correct_norm = 0
    for item in items:
        scores = independent_scores(main, item)
        best = max(range(len(scores)), key=lambda index: scores[index])
        best_norm = max(range(len(scores)), key=lambda index: scores[index] / len(item["choices"][index]))
        correct += best == item["label"]
        correct_norm += best_norm == item["label"]
    return correct / len(items), correct_norm / len(items)


def scoring_trainer(main, tmp_path, **values) -> Trainer:
    """A Trainer over the saved model, as a run that evaluates tasks builds it (nothing trained)."""
    tmp_path.mkdir()
    write_learnable_shards(tmp_path, 2048, "train")
    args = TrainingArguments(output_dir=str(tmp_path / "scoring"), train_file_pattern=str(tmp_path / "train_*.bin"),
                             block_size=16, train_batch_size=4, per_device_train_batch_size=4, max_train_steps=1,
                             report_to="none", optim="adamw_torch", tokenizer_name=str(main), **values)
    return Trainer(AutoModelForCausalLM.from_pretrained(main), args)


def test_task_accuracies_equal_an_independent_computation_on_the_saved_model(tmp_path, capsys):
    write_learnable_shards(tmp_path, 2048, "train")
    task = write_task(tmp_path / "words.jsonl", ITEMS)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"),
                             block_size=16, train_batch_size=4, per_device_train_batch_size=4, max_train_steps=3,
                             eval_every_steps=3, report_to="none", optim="adamw_torch", save_every_steps=0,
                             tokenizer_name=tiny_tokenizer_folder(tmp_path / "tokenizer"),
                             eval_tasks=f"{task},again={task}", max_eval_task_items=4)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args)
    records = [record for record in read_metrics(tmp_path / "run") if "eval_words_acc" in record]
    last = records[-1]
    best = max(record["eval_words_acc"] for record in records)
    assert f"best eval_words_acc {best:.4f} at step" in capsys.readouterr().out  # the end-of-run summary
    assert last["step"] == 3
    acc, acc_norm = independent_accuracies(tmp_path / "run" / "main", ITEMS[:4])
    assert last["eval_words_acc"] == pytest.approx(acc) and last["eval_words_acc_norm"] == pytest.approx(acc_norm)
    assert last["eval_again_acc"] == last["eval_words_acc"]
    # The scores behind them, choice by choice, from the timl code path on the saved model: through the training
    # forward's head path and through the model's own logits, each batch holding an empty row too.
    main = tmp_path / "run" / "main"
    tokenizer = AutoTokenizer.from_pretrained(main)
    for loss_implementation in ("full", "logits"):
        trainer = scoring_trainer(main, tmp_path / loss_implementation, loss_implementation=loss_implementation)
        trainer.training_model.eval()
        for index, item in enumerate(ITEMS):
            rows = [ChoiceRow(index, tuple(tokens), continuation) for tokens, continuation in
                    (choice_tokens(tokenizer, item["context"], choice, 16) for choice in item["choices"])]
            with torch.no_grad():
                ours = trainer.score_choices(choice_batch(rows, len(rows) + 1, 16))
            assert ours[-1] == 0  # the empty row
            assert ours[:-1].tolist() == pytest.approx(independent_scores(main, item), rel=1e-5)


def test_every_process_runs_the_forwards_of_the_busiest_and_the_counts_add_up(tmp_path):
    """Under FSDP every forward gathers parameters with every process, so each runs as many batches as the busiest
    (empty rows padding the rest); the counts of the processes add up to one process's. The rows here are scored
    by a stand-in for the model: the sum of their labelled token ids, known without a model."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_folder(tmp_path / "tokenizer"))
    task = Task("words", tuple(TaskItem(item["context"], tuple(item["choices"]), item["label"]) for item in ITEMS))
    calls: dict[int, list[torch.Size]] = {}

    def scorer(rank):
        def score_batch(inputs):
            calls.setdefault(rank, []).append(inputs["input_ids"].shape)
            labels = inputs["labels"]
            return torch.where(labels >= 0, labels, 0).sum(dim=-1).float()
        return score_batch

    def counts(rank, world_size):
        return score_task(scorer(rank), tokenizer, task, rank=rank, world_size=world_size,
                          device=torch.device("cpu"), block_size=128, rows_per_batch=2)

    alone = counts(0, 1)
    assert alone[2] == len(ITEMS)
    calls.clear()
    # Rank 0 holds items 0, 2, 4 (10 choices: 5 batches of 2), rank 1 items 1, 3 (4 choices: 2 batches).
    together = counts(0, 2) + counts(1, 2)
    assert batches_per_process(task, 2, 2) == 5 and len(calls[0]) == len(calls[1]) == 5
    assert torch.equal(together, alone)
    assert all(shape == (2, 64) for shape in calls[0] + calls[1])  # lengths rounded up to a few compiled shapes


def test_task_scoring_runs_compiled_when_training_is_and_gives_the_eager_accuracies(tmp_path):
    task = write_task(tmp_path / "words.jsonl", ITEMS)
    write_learnable_shards(tmp_path, 2048, "train")
    values = dict(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"), block_size=16,
                  train_batch_size=4, per_device_train_batch_size=4, max_train_steps=1, report_to="none",
                  optim="adamw_torch", tokenizer_name=tiny_tokenizer_folder(tmp_path / "tokenizer"), eval_tasks=task)
    from timl.model.build import build_config, build_model

    def evaluate(**more):
        torch.manual_seed(0)
        args = TrainingArguments(**values, **more)
        trainer = Trainer(build_model(build_config("gpt2", TINY_GPT2)), args)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        return trainer.evaluate(), torch._dynamo.utils.counters["stats"]["unique_graphs"]

    eager, eager_graphs = evaluate()
    compiled, compiled_graphs = evaluate(torch_compile="true")
    assert eager_graphs == 0 and compiled_graphs >= 1  # with no eval set, the tasks' forwards were the compiled ones
    assert compiled == pytest.approx(eager)


def test_a_malformed_task_file_is_named_with_its_line_before_the_model_is_built(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + json.dumps({"context": "w1", "choices": ["w2"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: not a task item .*two or more"):
        read_task("bad", path)
    path.write_text(json.dumps({"context": "w1", "choices": ["w2", "w3"], "label": 5}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: .*label must index the choices"):
        read_task("bad", path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=f"{path}:1: not a task item"):
        read_task("bad", path)
    assert parse_task_list("a/hella.jsonl, arc=b/c.jsonl") == [("hella", "a/hella.jsonl"), ("arc", "b/c.jsonl")]


def test_the_shipped_example_task_reads():
    from pathlib import Path

    task = read_task("python_facts", Path(__file__).resolve().parents[2] / "tasks" / "python_facts.jsonl")
    assert len(task.items) == 10 and all(len(item.choices) == 4 for item in task.items)


def test_two_processes_give_the_same_task_accuracies_as_one(tmp_path):
    """Five items over two ranks (three and two): the counts are summed, so the accuracy is the one-process one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from timl.config import parse_args

    root = Path(__file__).resolve().parents[2]
    write_learnable_shards(tmp_path, 4096, "train")
    task = write_task(tmp_path / "words.jsonl", ITEMS)
    tokenizer = tiny_tokenizer_folder(tmp_path / "tokenizer")

    def argv(output_dir) -> list[str]:
        return ["--model_name", "gpt2", "--config_overrides", TINY_GPT2, "--output_dir", str(output_dir),
                "--train_file_pattern", str(tmp_path / "train_*.bin"), "--block_size", "16",
                "--train_batch_size", "4", "--per_device_train_batch_size", "2", "--max_train_steps", "2",
                "--eval_every_steps", "2", "--save_every_steps", "0", "--report_to", "none", "--optim", "adamw_torch",
                "--tokenizer_name", tokenizer, "--eval_tasks", task]

    pretrain(*parse_args(ModelArguments, TrainingArguments, argv=argv(tmp_path / "one")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(root / "recipes" / "gpt2_c4.py"), *argv(tmp_path / "two")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = ([record for record in read_metrics(tmp_path / name) if "eval_words_acc" in record]
                for name in ("one", "two"))
    assert [record["step"] for record in one] == [record["step"] for record in two] == [0, 2]
    # Before training the two runs hold the same weights: the accuracies must be the same to the last item.
    assert (one[0]["eval_words_acc"], one[0]["eval_words_acc_norm"]) == (two[0]["eval_words_acc"],
                                                                          two[0]["eval_words_acc_norm"])

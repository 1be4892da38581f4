"""What the arguments make of a run: --debug's one step and one eval batch, and nothing uploaded; and arguments
files, whose values are converted as the command line converts them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.config import ModelArguments, TrainingArguments, parse_args
from timl.config.arguments import FIELD_GROUPS, METRIC_SCHEDULERS, SCHEDULERS, TRACKERS
from timl.train.pretrain import pretrain
from timl.train.trainer import check_files

ROOT = Path(__file__).resolve().parents[2]


def test_debug_evaluates_one_batch_and_uploads_nothing(tmp_path):
    write_learnable_shards(tmp_path, 4096, "train")
    eval_stream = write_learnable_shards(tmp_path, 640, "validation", seed=1)  # ten eval batches of 4 × 16 tokens
    run, uploads = tmp_path / "run", tmp_path / "uploads"
    args = TrainingArguments(output_dir=str(run), train_file_pattern=str(tmp_path / "train_*.bin"),
                             eval_file_pattern=str(tmp_path / "validation_*.bin"), block_size=16, train_batch_size=8,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, report_to="none",
                             optim="adamw_torch", push_to_hub=True, hub_target=str(uploads),
                             hub_model_id="someone/tiny", debug=True)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args)
    assert not uploads.exists()
    evals = [record for record in read_metrics(run) if "eval_loss" in record]
    assert [record["step"] for record in evals] == [0, 1]

    model = AutoModelForCausalLM.from_pretrained(run / "main").eval()
    tokens = torch.tensor(eval_stream.astype(np.int64))
    targets = torch.cat([tokens[1:], torch.tensor([-100])])
    with torch.no_grad():
        logits = model(input_ids=tokens.view(-1, 16)).logits.flatten(0, 1)
    first_batch = F.cross_entropy(logits[:64], targets[:64]).item()
    every_batch = F.cross_entropy(logits, targets, ignore_index=-100).item()
    assert abs(first_batch - every_batch) > 1e-4 * every_batch  # ten times the tolerance below
    assert evals[-1]["eval_loss"] == pytest.approx(first_batch, rel=1e-5)


def write_arguments_file(path, values: dict) -> str:
    path.write_text(json.dumps(values) if path.suffix == ".json" else yaml.safe_dump(values))
    return str(path)


def test_a_yaml_learning_rate_without_a_dot_is_a_float_and_trains(tmp_path):
    write_learnable_shards(tmp_path, 4096, "train")
    path = tmp_path / "args.yaml"
    # YAML 1.1 reads 1e-3 (no dot) as a string: the optimizer used to get "1e-3".
    path.write_text(f"config_overrides: {TINY_GPT2}\noutput_dir: {tmp_path / 'run'}\n"
                    f"train_file_pattern: {tmp_path / 'train_*.bin'}\nblock_size: 16\ntrain_batch_size: 4\n"
                    f"per_device_train_batch_size: 4\nmax_train_steps: 2\nlog_every_steps: 1\nsave_every_steps: 0\n"
                    f"report_to: none\noptim: adamw_torch\nlearning_rate: 1e-3\n"
                    f"lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {{min_lr: 1e-5}}\n")
    model_args, args = parse_args(ModelArguments, TrainingArguments, argv=[str(path)])
    assert type(args.learning_rate) is float and args.learning_rate == 0.001
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5}  # inside a mapping too, which no field type converts
    pretrain(model_args, args)
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "train_loss" in r] == [1, 2]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_values_are_converted_as_the_command_line_converts_them(tmp_path, suffix):
    values = {"output_dir": str(tmp_path / "run"), "learning_rate": "1e-3", "bf16": "false", "shuffle": "yes",
              "decay_embeddings": False, "max_train_steps": 3, "num_train_epochs": 2, "hub_private": None,
              "wandb_project": None, "lr_scheduler_type": "cosine_with_min_lr",
              "lr_scheduler_kwargs": {"min_lr": 1e-5}, "report_to": "none"}
    (from_file,) = parse_args(TrainingArguments, argv=[write_arguments_file(tmp_path / f"args{suffix}", values)])
    argv = ["--output_dir", str(tmp_path / "run"), "--learning_rate", "1e-3", "--bf16", "false", "--shuffle", "yes",
            "--decay_embeddings", "false", "--max_train_steps", "3", "--num_train_epochs", "2",
            "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 1e-5}',
            "--report_to", "none"]
    (from_command_line,) = parse_args(TrainingArguments, argv=argv)
    from_command_line.logging.wandb_project = None  # the one value a command line cannot give
    assert from_file == from_command_line
    assert (from_file.learning_rate, from_file.bf16, from_file.shuffle, from_file.num_train_epochs) == (
        0.001, False, True, 2.0)
    assert type(from_file.num_train_epochs) is float and from_file.hub_private is None


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_values_that_do_not_convert_are_reported_at_once_naming_the_file(tmp_path, suffix):
    path = write_arguments_file(tmp_path / f"args{suffix}", {
        "max_train_steps": "twenty", "warmup_steps": 1.5, "bf16": "maybe", "block_size": None,
        "learning_rate": [0.1], "attn_implementation": "sdpb", "colour": "blue", "report_to": "none"})
    with pytest.raises(ValueError) as error:
        parse_args(ModelArguments, TrainingArguments, argv=[path])
    message = str(error.value)
    assert message.startswith(f"Invalid arguments in {path}:")
    for expected in ("max_train_steps: expected int | None, got 'twenty'", "warmup_steps: expected int, got 1.5",
                     "bf16: expected bool, got 'maybe'", "block_size: expected int, got None",
                     "learning_rate: expected float, got [0.1]", "attn_implementation: expected one of None, sdpa",
                     "unknown arguments: colour"):
        assert expected in message


@dataclass
class ListArguments:
    sizes: list[int] = field(default_factory=list, metadata={"help": "A list field, as a user's dataclass may have."})


def test_a_list_field_takes_a_list_converted_item_by_item(tmp_path):
    path = write_arguments_file(tmp_path / "args.yaml", {"sizes": [1, "2"]})
    assert parse_args(ListArguments, argv=[path]) == parse_args(ListArguments, argv=["--sizes", "1", "2"])
    with pytest.raises(ValueError, match="sizes: expected list\\[int\\], got \\[1.5\\]"):
        parse_args(ListArguments, argv=[write_arguments_file(tmp_path / "bad.yaml", {"sizes": [1.5]})])


# The arguments in groups: one per concern, a flat command line, checks at parse time that need no file.

def test_importing_and_parsing_the_arguments_imports_no_torch(tmp_path):
    code = ("import sys\n"
            "from timl.config import ModelArguments, TrainingArguments, parse_args\n"
            "model, args = parse_args(ModelArguments, TrainingArguments, argv=['--learning_rate', '1e-3',\n"
            "                         '--report_to', 'none', '--train_file_pattern', 'nowhere/*.bin'])\n"
            "assert args.optimizer.learning_rate == 1e-3\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'accelerate')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_timl_train_refuses_a_bad_flag_before_it_imports_torch():
    code = ("import sys\n"
            "from timl.cli import main\n"
            "try:\n"
            "    main(['train', '--learning_rate', 'fast'])\n"
            "except SystemExit as exit:\n"
            "    print(exit.code, sorted(name for name in sys.modules if name.split('.')[0] == 'torch'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "2 []", result.stderr
    assert "--learning_rate" in result.stderr


def test_the_scheduler_and_tracker_names_are_transformers_and_accelerates():
    from accelerate.utils import LoggerType
    from transformers.trainer_utils import SchedulerType

    assert set(SCHEDULERS) | set(METRIC_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(TRACKERS) == {t.value for t in LoggerType}


def test_every_flag_belongs_to_exactly_one_group():
    names = [f.name for group in TrainingArguments.GROUPS.values() for f in dataclasses.fields(group)]
    assert len(names) == len(set(names)) == len(FIELD_GROUPS)
    assert not set(names) & {f.name for f in dataclasses.fields(ModelArguments)}


def test_flat_values_reach_their_groups_and_replace_keeps_the_rest():
    args = TrainingArguments(output_dir="run", learning_rate=1e-3, block_size=16, train_batch_size=4,
                             per_device_train_batch_size=2, report_to="none")
    assert (args.optimizer.learning_rate, args.data.block_size, args.checkpoint.output_dir) == (1e-3, 16, "run")
    assert args.learning_rate == 1e-3 and args.gradient_accumulation_steps == 2  # flat reads, as callbacks use
    changed = dataclasses.replace(args, learning_rate=2e-3)
    assert changed.optimizer.learning_rate == 2e-3 and changed.data.block_size == 16
    assert args.optimizer.learning_rate == 1e-3  # the original is untouched
    assert TrainingArguments(**args.to_dict()) == args
    with pytest.raises(AttributeError, match=r"args\.optimizer\.learning_rate"):
        args.learning_rate = 3e-3
    with pytest.raises(TypeError, match="learning_rat\\b"):
        TrainingArguments(learning_rat=1e-3)


def test_parsing_reads_no_file_and_the_trainer_start_checks_them(tmp_path):
    used = tmp_path / "used"
    (used / "step10").mkdir(parents=True)
    args = TrainingArguments(output_dir=str(used), train_file_pattern=str(tmp_path / "missing_*.bin"),
                             report_to="none")  # neither the shards nor the folder is looked at yet
    with pytest.raises(ValueError) as raised:
        check_files(args)
    message = str(raised.value)
    assert "--train_file_pattern" in message and "missing_*.bin" in message
    assert str(used) in message and "--overwrite_output_dir" in message


def test_problems_of_several_groups_are_reported_together():
    with pytest.raises(ValueError) as raised:
        TrainingArguments(block_size=0, warmup_ratio=2.0, z_loss_coefficient=-1.0, fp8="e5m2", save_total_limit=0,
                          report_to="nowhere", max_eval_steps=1, max_eval_tokens=64)
    message = str(raised.value)
    for flag in ("--block_size", "--warmup_ratio", "--z_loss_coefficient", "--fp8", "--save_total_limit",
                 "--report_to", "--max_eval_steps and --max_eval_tokens"):
        assert flag in message

"""What the file-pattern arguments name, and the Trainer over it: epochs, shuffling, mixtures, named eval sets, and an
eval loss that counts every token at one and two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.config import ModelArguments, TrainingArguments, parse_args
from timl.data.mixture import MixtureLoader
from timl.train.pretrain import make_model, pretrain
from timl.data.sources import Source, parse_sources
from timl.train.trainer import Trainer, check_files

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16


def test_a_plain_pattern_stays_one_source_whatever_it_holds():
    for pattern in ("data/train_*.bin", "data/a,b/train_*.bin", "C:/data/x_*.bin:0.5"):
        assert parse_sources(pattern, "--train_file_pattern") == [Source(None, pattern)]


def test_named_sources_with_weights_and_colons_in_paths():
    assert parse_sources("web=data/web/*.bin:0.7, code = C:/code/*.bin:0.3,x=a:b/*.bin", "--f") == [
        Source("web", "data/web/*.bin", 0.7), Source("code", "C:/code/*.bin", 0.3), Source("x", "a:b/*.bin")]
    listed = [{"name": "web", "pattern": "w/*.bin", "weight": 2}, {"name": "code", "pattern": "c/*.bin"}]
    assert parse_sources(listed, "--f") == [Source("web", "w/*.bin", 2.0), Source("code", "c/*.bin")]
    with pytest.raises(ValueError, match=r"--f: 'c/\*.bin' has no name; write every source as name=glob"):
        parse_sources("web=w/*.bin,c/*.bin", "--f")
    with pytest.raises(ValueError, match="--f names web more than once"):
        parse_sources("web=w/*.bin,web=c/*.bin", "--f")


@pytest.fixture
def data(tmp_path):
    write_learnable_shards(tmp_path, 1024, "train", seed=0)  # 8 steps of 8 × 16 tokens: one epoch is short
    (tmp_path / "code").mkdir()
    write_learnable_shards(tmp_path / "code", 768, "train", seed=2)
    for prefix, length, seed in (("evala", 200, 1), ("evalb", 40, 3)):  # neither a multiple of an eval batch
        write_learnable_shards(tmp_path, length, prefix, seed=seed)
    return tmp_path


def args_for(data_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(data_dir / "run"), train_file_pattern=str(data_dir / "train_*.bin"), block_size=BLOCK,
                  train_batch_size=8, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  learning_rate=3e-3, lr_scheduler_type="constant", log_every_steps=1, eval_every_steps=0,
                  save_every_steps=0, report_to="none", optim="adamw_torch")
    return TrainingArguments(**{**values, **overrides})


def train(args: TrainingArguments) -> Trainer:
    trainer = Trainer(make_model(ModelArguments(config_overrides=TINY_GPT2), args), args)
    trainer.train()
    return trainer


def test_the_new_syntax_is_checked_with_the_argument_named(data):
    args = args_for(data, train_file_pattern=f"web={data}/train_*.bin:0.7,code={data}/missing_*.bin:-1",
                    eval_file_pattern=f"val={data}/evala_*.bin:0.5")
    with pytest.raises(ValueError) as error:
        check_files(args)  # when the run starts, before the model is built
    message = str(error.value)
    for expected in ("--train_file_pattern: source 'code': No file matches the pattern",
                     "--train_file_pattern: source 'code' has weight -1; weights must be positive",
                     "--train_file_pattern names several sources, which have no common epoch: give --max_train_steps",
                     "--eval_file_pattern: eval sets take no weights (got val)"):
        assert expected in message


def test_sources_can_be_listed_in_a_yaml_file(data):
    path = data / "args.yaml"
    path.write_text(f"train_file_pattern:\n  - {{name: web, pattern: '{data}/train_*.bin', weight: 0.7}}\n"
                    f"  - {{name: code, pattern: '{data}/code/train_*.bin', weight: 0.3}}\n"
                    f"max_train_steps: 3\nreport_to: none\n")
    (args,) = parse_args(TrainingArguments, argv=[str(path)])
    assert [source.name for source in parse_sources(args.train_file_pattern, "")] == ["web", "code"]


def test_training_past_one_pass_repeats_the_data_and_num_train_epochs_sets_the_length(data):
    trainer = train(args_for(data, num_train_epochs=2.5))
    steps = [record["step"] for record in read_metrics(data / "run") if "train_loss" in record]
    assert steps == list(range(1, 21))  # 2.5 epochs of 8 steps
    assert trainer.train_loader.epoch == pytest.approx(2.5)
    longer = train(args_for(data, max_train_steps=30, shuffle=True, output_dir=str(data / "longer")))
    assert longer.train_loader.epoch == pytest.approx(30 / 8)


def test_a_resume_mid_second_epoch_of_shuffled_data_matches_an_uninterrupted_run(data):
    whole = args_for(data, max_train_steps=14, shuffle=True, seed=3, output_dir=str(data / "whole"))
    train(whole)
    train(args_for(data, max_train_steps=11, shuffle=True, seed=3, output_dir=str(data / "parts")))
    train(args_for(data, max_train_steps=14, shuffle=True, seed=3, output_dir=str(data / "parts"),
                   resume_from_checkpoint="latest"))
    # Steps 1-11, then 12-14 from the checkpoint: a run that started afresh instead would log 1-14 a second time.
    assert [r["step"] for r in read_metrics(data / "parts") if "train_loss" in r] == list(range(1, 15))
    losses = lambda name: {r["step"]: r["train_loss"] for r in read_metrics(data / name) if "train_loss" in r}
    resumed, uninterrupted = losses("parts"), losses("whole")
    for step in range(12, 15):  # the steps after the resume, inside the second epoch
        assert resumed[step] == uninterrupted[step], step


def test_a_mixture_trains_and_counts_tokens_per_source(data):
    args = args_for(data, train_file_pattern=f"web={data}/train_*.bin:0.75,code={data}/code/train_*.bin:0.25",
                    max_train_steps=10)
    trainer = train(args)
    assert isinstance(trainer.train_loader, MixtureLoader)
    tokens = trainer.train_loader.source_tokens()
    assert tokens == {"web": 60 * BLOCK, "code": 20 * BLOCK}  # 10 steps × 8 sequences, 3:1
    assert trainer.train_loader.progress()["epoch_web"] == pytest.approx(60 * BLOCK / 1024)


def independent_eval_loss(model: torch.nn.Module, stream: np.ndarray) -> float:
    """The mean next-token loss over every token of the stream (the last has no label), in block-size sequences."""
    tokens = torch.tensor(stream.astype(np.int64))
    targets = torch.cat([tokens[1:], torch.tensor([-100])])
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), BLOCK):
            logits = model(input_ids=tokens[None, start : start + BLOCK]).logits[0]
            total += F.cross_entropy(logits, targets[start : start + BLOCK], reduction="sum").item()
            count += len(logits) - int(start + BLOCK >= len(tokens))
    assert count == len(tokens) - 1
    return total / count


def run_recipe(argv: list[str], processes: int) -> None:
    """One process trains in this one (a launch costs seconds of imports); more are launched with torchrun."""
    if processes == 1:
        pretrain(*parse_args(ModelArguments, TrainingArguments, argv=argv))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run([*launcher, str(ROOT / "recipes" / "gpt2_c4.py"), *argv], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("processes", [1, 2])
def test_the_eval_loss_counts_every_token_of_each_eval_set(data, processes):
    # One process: the single unnamed set, logged as eval_loss. Two: named sets, one smaller than a batch.
    eval_pattern = str(data / "evala_*.bin") if processes == 1 else f"a={data}/evala_*.bin,b={data}/evalb_*.bin"
    output_dir = data / f"run{processes}"
    argv = ["--model_name", "gpt2", "--config_overrides", TINY_GPT2, "--output_dir", str(output_dir),
            "--train_file_pattern", str(data / "train_*.bin"), "--eval_file_pattern", eval_pattern,
            "--block_size", str(BLOCK), "--train_batch_size", "8", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", "--max_train_steps", "2", "--eval_every_steps", "0",
            "--save_every_steps", "0", "--report_to", "none", "--optim", "adamw_torch"]
    run_recipe(argv, processes)
    logged = [record for record in read_metrics(output_dir) if any(key.startswith("eval_") for key in record)][-1]
    model = AutoModelForCausalLM.from_pretrained(output_dir / "main").eval()
    streams = {name: np.concatenate([np.fromfile(path, dtype="<u2", offset=1024) for path in sorted(data.glob(f"{prefix}_*.bin"))])
               for name, prefix in (("eval_", "evala"), ("eval_a_", "evala"), ("eval_b_", "evalb"))}
    names = ["eval_"] if processes == 1 else ["eval_a_", "eval_b_"]
    assert sorted(key for key in logged if key.endswith("loss")) == sorted(f"{name}loss" for name in names)
    for name in names:
        assert logged[f"{name}loss"] == pytest.approx(independent_eval_loss(model, streams[name]), rel=1e-5), name

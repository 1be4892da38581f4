"""The performance plan (timl/train/plan.py): which choice on which hardware, what an override costs, the folded
flags, and the frozen command line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from architectures import tiny_model
from conftest import TINY_GPT2, write_learnable_shards
from timl.config import ModelArguments, TrainingArguments, parse_args
from timl.model.build import build_config, build_model
from timl.model.forward import use_flex_for_documents
from timl.train.plan import VOCAB_MULTIPLE, make_plan
from timl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
GPU, CPU = torch.device("cuda"), torch.device("cpu")  # the plan reads the device's type; nothing runs on it

# `timl train`'s flags and defaults. A change here is a change to every user's command line: make it on purpose, and
# give a removed flag its one-line error in timl.config.arguments.REMOVED_FLAGS.
FROZEN_FLAGS = {
    'model_name': 'gpt2', 'config_overrides': None, 'from_pretrained': None, 'attn_implementation': None,
    'trust_remote_code': False, 'train_file_pattern': None, 'eval_file_pattern': None, 'block_size': 1024,
    'train_batch_size': 512, 'per_device_train_batch_size': 32, 'per_device_eval_batch_size': 64,
    'max_eval_tokens': None, 'max_eval_task_items': None, 'eval_tasks': None, 'tokenizer_name': None,
    'shuffle': False, 'document_masking': False,
    'max_train_tokens': None,
    'max_train_steps': None, 'num_train_epochs': 1.0, 'log_every_steps': 10, 'eval_every_steps': 100,
    'max_eval_steps': None, 'early_stopping_patience': None, 'skip_nonfinite_steps': 0, 'seed': 0,
    'full_determinism': False, 'debug': False, 'optim': 'adamw_torch_fused', 'learning_rate': 0.0006,
    'weight_decay': 0.1, 'adam_beta1': 0.9, 'adam_beta2': 0.95, 'adam_epsilon': 1e-08, 'max_grad_norm': 1.0,
    'muon_learning_rate': 0.02, 'muon_momentum': 0.95, 'muon_weight_decay': 0.0, 'decay_embeddings': True,
    'lr_scheduler_type': 'cosine', 'lr_scheduler_kwargs': None, 'warmup_ratio': 0.0, 'warmup_steps': 0,
    'loss_implementation': 'auto', 'z_loss_coefficient': 0.0, 'liger_kernel_kwargs': None,
    'cut_cross_entropy_kwargs': None, 'bf16': True, 'torch_compile': 'auto', 'activation_memory': 'none',
    'fp8': None, 'pad_vocab_size_to': 'auto', 'forward_kwargs': None, 'output_dir': 'runs/timl',
    'overwrite_output_dir': False, 'save_every_steps': 1000, 'save_total_limit': None,
    'resume_from_checkpoint': None, 'push_to_hub': False, 'hub_model_id': None, 'hub_token': None,
    'hub_private': None, 'hub_target': 'hub', 'preemption_upload_seconds': 20.0, 'report_to': 'wandb',
    'wandb_project': 'timl', 'wandb_run_name': None,
}


def tiny_gpt2() -> torch.nn.Module:
    return build_model(build_config("gpt2", TINY_GPT2))


def plan_for(device: torch.device, model: torch.nn.Module | None = None, **values):
    args = TrainingArguments(output_dir="unused", report_to="none", **values)
    return make_plan(args.compute, device, model if model is not None else tiny_gpt2())


def test_the_command_line_is_frozen():
    import dataclasses

    flags = {f.name: f.default for f in dataclasses.fields(ModelArguments)}
    flags |= {f.name: f.default for group in TrainingArguments.GROUPS.values() for f in dataclasses.fields(group)}
    assert flags == FROZEN_FLAGS


def test_on_a_gpu_the_plan_compiles_each_block_pads_the_vocab_and_trains_in_bf16():
    plan = plan_for(GPU)
    assert (plan.compile, plan.pad_vocab_to, plan.bf16, plan.activation_memory) == ("blocks", VOCAB_MULTIPLE, True,
                                                                                     "none")
    text = plan.describe("loss: chunked")
    for part in ("compile: each transformer block", f"vocab padding: to a multiple of {VOCAB_MULTIPLE}",
                 "precision: bf16", "attention: ", "loss: chunked"):
        assert part in text


def test_a_loss_on_the_models_own_logits_is_compiled_with_the_whole_model():
    args = TrainingArguments(output_dir="unused", report_to="none")
    plan = make_plan(args.compute, GPU, tiny_gpt2(), loss_path="logits")
    assert plan.compile == "model" and "own logits" in plan.describe()


def test_on_the_cpu_the_plan_compiles_nothing_and_pads_nothing():
    plan = plan_for(CPU)
    assert (plan.compile, plan.pad_vocab_to, plan.bf16) == ("off", None, False)


def test_a_model_without_block_classes_is_compiled_whole():
    class Plain(torch.nn.Module):
        pass

    assert plan_for(GPU, Plain()).compile == "model"


@pytest.mark.parametrize("values,warning", [
    (dict(torch_compile="false"), "--torch_compile false on a GPU"),
    (dict(torch_compile="model"), "--torch_compile model"),
    (dict(pad_vocab_size_to="none"), "--pad_vocab_size_to none on a GPU"),
    (dict(bf16=False), "--bf16 false on a GPU"),
])
def test_an_override_that_is_slower_on_a_gpu_says_so_once(values, warning, caplog):
    with caplog.at_level(logging.WARNING, logger="timl.train.plan"):
        plan_for(GPU, **values)
    said = [record.message for record in caplog.records if warning in record.message]
    assert len(said) == 1 and said[0].startswith("Slower than the plan")


def test_document_masking_on_a_gpu_without_timls_block_mask_says_it_is_slower(caplog):
    args = TrainingArguments(output_dir="unused", report_to="none")
    llama = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="timl.train.plan"):
        make_plan(args.compute, GPU, llama, document_masking=True)
    assert any("--document_masking with sdpa attention" in record.message for record in caplog.records)
    caplog.clear()
    assert use_flex_for_documents(llama)
    with caplog.at_level(logging.WARNING, logger="timl.train.plan"):
        plan = make_plan(args.compute, GPU, llama, document_masking=True)
    assert not any("--document_masking" in record.message for record in caplog.records)
    assert "attention: flex_attention with timl's document block mask" in plan.describe()


def test_overrides_are_taken_as_given():
    plan = plan_for(GPU, torch_compile="true", pad_vocab_size_to="128", activation_memory="0.5", fp8="rowwise")
    assert (plan.compile, plan.pad_vocab_to, plan.activation_memory_budget) == ("model", 128, 0.5)
    assert (plan.fp8, plan.fp8_head) == ("rowwise", False)
    assert plan_for(CPU, torch_compile="blocks").compile == "blocks"


def test_a_compiler_memory_setting_without_compilation_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match="--activation_memory selective is the compiler's, and compilation is off"):
        plan_for(CPU, activation_memory="selective")


@pytest.mark.parametrize("flag,replacement", [
    ("regional_compilation", "--torch_compile blocks"), ("activation_checkpointing", "--activation_memory full"),
    ("compile_recompute_pointwise", "--activation_memory selective"),
    ("use_liger_kernel", "--loss_implementation liger"),
    ("fp8_output_head", "--fp8 tensorwise_head"), ("torch_compile_mode", "the default mode is the fastest measured"),
])
def test_a_removed_flag_gets_one_line_naming_its_replacement(flag, replacement, tmp_path):
    result = subprocess.run([sys.executable, "-m", "timl", "train", f"--{flag}", "true", "--report_to", "none"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.strip() == f"timl: --{flag} was removed: use {timl_replacement(flag)}"
    assert replacement in result.stderr
    with pytest.raises(TypeError, match=f"{flag} was removed: use"):
        TrainingArguments(**{flag: True})
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({flag: True, "report_to": "none"}))
    with pytest.raises(ValueError, match=f"{path}[\\s\\S]*{flag} was removed: use"):
        parse_args(TrainingArguments, argv=[str(path)])


def timl_replacement(flag: str) -> str:
    from timl.config.arguments import REMOVED_FLAGS

    return REMOVED_FLAGS[flag]


def test_the_trainer_prints_the_plan_once_with_the_loss_and_the_optimizer(tmp_path, caplog):
    write_learnable_shards(tmp_path, 1024, "train")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"),
                             block_size=16, train_batch_size=4, per_device_train_batch_size=4, max_train_steps=1,
                             report_to="none", optim="adamw_torch")
    with caplog.at_level(logging.INFO):
        Trainer(tiny_gpt2(), args)
    plans = [record.message for record in caplog.records if record.message.startswith("Performance plan:")]
    assert len(plans) == 1
    for part in ("compile: off", "loss: full through the head", "optimizer: adamw_torch"):
        assert part in plans[0]


def test_the_padding_the_plan_chooses_reaches_the_model_and_its_saved_config(tmp_path):
    write_learnable_shards(tmp_path, 1024, "train")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"),
                             block_size=16, train_batch_size=4, per_device_train_batch_size=4, max_train_steps=1,
                             report_to="none", optim="adamw_torch", pad_vocab_size_to="48", save_every_steps=0)
    model = tiny_gpt2()  # vocab 64, which 48 pads to 96
    Trainer(model, args).train()
    assert model.get_input_embeddings().weight.shape[0] == 96
    config = AutoConfig.from_pretrained(tmp_path / "run" / "main")
    assert config.vocab_size == 96
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "main").get_input_embeddings().weight.shape[0] == 96


def test_auto_micro_batch_is_the_largest_divisor_of_the_share_that_fits():
    from timl.train.plan import MEMORY_HEADROOM, choose_micro_batch

    gib = 2**30
    # A fake of the GPU's measurement (none here): 1 GiB a sequence on top of 2 GiB of weights and gradients.
    measured = []

    def measure(size: int) -> int:
        measured.append(size)
        return 2 * gib + size * gib

    # 10 GiB of optimizer state (8 bytes for each of 1.25 G parameters), 40 GiB usable: 28 sequences would fit.
    total = int(40 * gib / MEMORY_HEADROOM)
    size, line = choose_micro_batch(64, GPU, measure, parameter_count=10 * gib // 8, total_memory=total)
    assert (size, measured) == (16, [1, 2])  # 16 divides 64; 32 would not fit
    assert "micro-batch: 16 of this process's 64" in line
    with pytest.raises(ValueError, match="not even one sequence fits"):
        choose_micro_batch(64, GPU, measure, parameter_count=10 * gib // 8, total_memory=8 * gib)
    assert choose_micro_batch(12, CPU, measure, parameter_count=1, total_memory=None)[0] == 12


def test_auto_micro_batch_on_the_command_line_and_in_a_file_trains_with_the_whole_share_on_the_cpu(tmp_path):
    write_learnable_shards(tmp_path, 2048, "train")
    values = dict(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"), block_size=16,
                  train_batch_size=8, max_train_steps=2, report_to="none", optim="adamw_torch", save_every_steps=0)
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({**values, "per_device_train_batch_size": "auto"}))
    (from_file,) = parse_args(TrainingArguments, argv=[str(path)])
    argv = [word for name, value in values.items() for word in (f"--{name}", str(value))]
    (from_command_line,) = parse_args(TrainingArguments, argv=[*argv, "--per_device_train_batch_size", "auto"])
    assert from_file == from_command_line and from_file.per_device_train_batch_size == 0
    trainer = Trainer(tiny_gpt2(), from_file)
    assert trainer.args.per_device_train_batch_size == 8 and trainer.args.gradient_accumulation_steps == 1
    trainer.train()
    import json

    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["args"]["per_device_train_batch_size"] == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_micro_batch_measures_the_gpu_and_leaves_the_weights_as_they_were(tmp_path):
    write_learnable_shards(tmp_path, 2048, "train")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"),
                             block_size=16, train_batch_size=8, per_device_train_batch_size="auto", max_train_steps=1,
                             report_to="none", save_every_steps=0, torch_compile="false")
    model = tiny_gpt2()  # its vocab, 64, is already padded
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = Trainer(model, args)
    assert trainer.args.per_device_train_batch_size == 8  # a tiny model: the whole share fits
    assert all(torch.equal(value.cpu(), before[name]) for name, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert trainer.peak_bytes_of_a_step(8) > trainer.peak_bytes_of_a_step(1)
    trainer.train()

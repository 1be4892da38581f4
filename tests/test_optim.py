"""Optimizers: Muon with auxiliary AdamW, parameter groups, several optimizers, z-loss, custom models, WSD."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.arguments import TrainingArguments, parse_args
from timl.checkpoint import load_weights
from timl.losses import linear_cross_entropy
from timl.modeling import build_config, build_model
from timl.optim import check_groups, create_optimizers, parameter_kinds
from timl.recipe import ModelArguments, pretrain
from timl.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data(tmp_path):
    write_learnable_shards(tmp_path, 8192, "train")
    write_learnable_shards(tmp_path, 640, "validation", seed=1)
    return tmp_path


def tiny_args(data_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(data_dir / "run"), train_file_pattern=str(data_dir / "train_*.bin"),
                  eval_file_pattern=str(data_dir / "validation_*.bin"), block_size=16, train_batch_size=8,
                  per_device_train_batch_size=8, per_device_eval_batch_size=4, max_train_steps=6,
                  log_every_steps=1, eval_every_steps=3, save_every_steps=2, report_to="none", optim="adamw_torch")
    return TrainingArguments(**{**values, **overrides})


def reference_muon_update(weight, grad, lr, momentum, weight_decay, steps=5):
    """Keller Jordan's Muon, written out in float64: Nesterov momentum, then a quintic Newton-Schulz
    orthogonalisation, scaled by sqrt(max(1, rows / cols))."""
    buffer = (1 - momentum) * grad  # the momentum buffer starts at zero
    update = grad + momentum * (buffer - grad)
    a, b, c = 3.4445, -4.775, 2.0315
    x = update.T if update.shape[0] > update.shape[1] else update
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if update.shape[0] > update.shape[1] else x
    return weight * (1 - lr * weight_decay) - lr * math.sqrt(max(1, weight.shape[0] / weight.shape[1])) * x


def test_a_muon_step_matches_a_reference_computation_of_its_update():
    torch.manual_seed(0)
    weight, grad = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    parameter = torch.nn.Parameter(weight.float().clone())
    optimizer = torch.optim.Muon([parameter], lr=0.02, momentum=0.95, weight_decay=0.1)
    parameter.grad = grad.float()
    optimizer.step()
    expected = reference_muon_update(weight, grad, 0.02, 0.95, 0.1)
    change, expected_change = parameter.detach().double() - weight, expected - weight
    # torch runs Newton-Schulz in bf16, so the update agrees to bf16 precision.
    assert ((change - expected_change).norm() / expected_change.norm()).item() < 2e-2


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(data):
    model = build_model(build_config("gpt2", TINY_GPT2))
    optimizers = dict(create_optimizers(model, tiny_args(data, optim="muon")))
    muon_ids = {id(p) for group in optimizers["muon"].param_groups for p in group["params"]}
    kinds = parameter_kinds(model)
    for name, parameter in model.named_parameters():
        assert (id(parameter) in muon_ids) == (kinds[name] == "matrix"), name
    assert kinds["transformer.wte.weight"] == "embedding" and kinds["transformer.h.0.ln_1.weight"] == "vector"
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "matrix"
    adamw_groups = optimizers["adamw"].param_groups
    no_decay = {id(p) for group in adamw_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(model.transformer.h[0].ln_1.weight) in no_decay and id(model.transformer.wte.weight) not in no_decay
    check_groups(model, list(optimizers.values()))


def test_embeddings_can_be_left_undecayed(data):
    model = build_model(build_config("gpt2", TINY_GPT2))
    (_, adamw), = create_optimizers(model, tiny_args(data, decay_embeddings=False))
    no_decay = {id(p) for group in adamw.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(model.transformer.wte.weight) in no_decay


def test_bad_groupings_fail_with_a_clear_message(data):
    model = build_model(build_config("gpt2", TINY_GPT2))
    parameters = list(model.parameters())
    with pytest.raises(ValueError, match="in no optimizer group: transformer.wte.weight"):
        check_groups(model, [torch.optim.AdamW(parameters[1:])])
    with pytest.raises(ValueError, match="in more than one group: transformer.wte.weight"):
        check_groups(model, [torch.optim.AdamW(parameters), torch.optim.SGD(parameters[:1])])


def test_muon_training_logs_each_optimizers_rate_and_learns(data):
    latest = pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, optim="muon", max_train_steps=30,
                      save_every_steps=0, eval_every_steps=30, lr_scheduler_type="constant", learning_rate=3e-3))
    assert latest["lr_muon"] == 0.02 and latest["lr_adamw"] == 3e-3
    evals = [r["eval_loss"] for r in read_metrics(data / "run") if "eval_loss" in r]
    assert evals[-1] < 0.7 * evals[0]


def test_two_optimizers_with_their_own_schedules_resume_exactly(data):
    def run(output, **overrides):
        model = build_model(build_config("gpt2", TINY_GPT2))
        decay = [p for n, p in model.named_parameters() if p.ndim == 2]
        rest = [p for n, p in model.named_parameters() if p.ndim != 2]
        first, second = torch.optim.AdamW(decay, lr=1e-3), torch.optim.SGD(rest, lr=0.1, momentum=0.9)
        pairs = [(first, torch.optim.lr_scheduler.LinearLR(first, 1.0, 0.1, total_iters=6)),
                 (second, torch.optim.lr_scheduler.StepLR(second, step_size=2, gamma=0.5))]
        Trainer(model, tiny_args(data, output_dir=str(data / output), **overrides), optimizers=pairs).train()
        return {r["step"]: (r["train_loss"], r["lr_adamw"], r["lr_sgd"]) for r in read_metrics(data / output)
                if "train_loss" in r}

    torch.manual_seed(0)
    reference = run("whole")
    torch.manual_seed(0)
    run("parts", max_train_steps=6, save_every_steps=4)
    (data / "parts" / "step6").rename(data / "parts" / ".step6.discarded")  # as if killed after step 4's save
    torch.manual_seed(0)
    resumed = run("parts", resume_from_checkpoint="latest")
    assert resumed == reference


TWO_RANK_MUON = textwrap.dedent("""
    import json, sys, torch
    from timl.arguments import TrainingArguments
    from timl.modeling import build_config, build_model
    from timl.trainer import Trainer
    data, out, overrides = sys.argv[1:4]
    torch.manual_seed(int(__import__("os").environ["RANK"]))  # different initial weights on each rank
    model = build_model(build_config("gpt2", overrides))
    args = TrainingArguments(output_dir=out, train_file_pattern=data + "/train_*.bin", block_size=16,
                             train_batch_size=8, per_device_train_batch_size=2, max_train_steps=5, optim="muon",
                             report_to="none", save_every_steps=0, log_every_steps=5)
    trainer = Trainer(model, args)
    trainer.train()
    weights = {name: p.detach().double().sum().item() for name, p in model.named_parameters()}
    with open(f"{out}/weights_{trainer.accelerator.process_index}.json", "w") as file:
        json.dump(weights, file)
""")


def test_muon_under_ddp_leaves_identical_weights_on_every_rank(data):
    script = data / "two_ranks_muon.py"
    script.write_text(TWO_RANK_MUON)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(data), str(data / "out"), TINY_GPT2], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((data / "out" / f"weights_{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1


def test_z_loss_adds_the_expected_amount_on_a_known_input():
    hidden = torch.zeros(5, 8)  # zero logits: every token's log-normaliser is ln(vocab)
    weight = torch.randn(16, 8)
    labels = torch.tensor([1, 2, 3, -100, 4])
    cross_entropy, z_loss = linear_cross_entropy(hidden, weight, labels, vocab_size=16, z_loss_coefficient=1e-2)
    assert cross_entropy.item() == pytest.approx(4 * math.log(16), rel=1e-6)
    assert z_loss.item() == pytest.approx(4 * 1e-2 * math.log(16) ** 2, rel=1e-6)


def test_z_loss_is_trained_on_and_logged_apart(data):
    pretrain(ModelArguments(config_overrides=TINY_GPT2), tiny_args(data, z_loss_coefficient=1e-3, max_train_steps=2))
    first = next(r for r in read_metrics(data / "run") if "train_loss" in r)
    # At initialisation the logits are near zero, so the z-loss is about 1e-3 × ln(64)².
    assert first["train_z_loss"] == pytest.approx(1e-3 * math.log(64) ** 2, rel=0.05)
    assert first["train_loss"] == pytest.approx(math.log(64), rel=0.05)


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_a_custom_model_trains_saves_resumes_and_reloads(data):
    recipe = load_recipe("custom_gpt")
    config = recipe.GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, max_positions=16)

    def run(output, **overrides):
        torch.manual_seed(0)
        model = recipe.GPT(config)
        # A constant schedule, so that the shorter first run follows the same rates as the whole one.
        Trainer(model, tiny_args(data, output_dir=str(data / output), optim="muon", lr_scheduler_type="constant",
                                 **overrides)).train()
        return model, {r["step"]: r["train_loss"] for r in read_metrics(data / output) if "train_loss" in r}

    model, reference = run("whole")
    run("parts", max_train_steps=4)
    _, resumed = run("parts", resume_from_checkpoint="latest")
    assert resumed == reference and reference[6] < reference[1]
    assert json.loads((data / "whole" / "main" / "config.json").read_text())["n_embd"] == 32
    reloaded = recipe.GPT(config)
    load_weights(reloaded, data / "whole" / "main")
    inputs = torch.randint(0, 64, (2, 16))
    assert torch.equal(reloaded(inputs), model(inputs))


def test_the_wsd_recipe_parses_and_runs(data):
    settings = yaml.safe_load((ROOT / "recipes" / "gpt2_wsd.yaml").read_text())
    settings.update(train_file_pattern=str(data / "train_*.bin"), eval_file_pattern=str(data / "validation_*.bin"),
                    output_dir=str(data / "run"), max_train_tokens=None, max_train_steps=10, block_size=16,
                    train_batch_size=8, per_device_train_batch_size=8, per_device_eval_batch_size=4,
                    max_eval_tokens=None, torch_compile=False, config_overrides=TINY_GPT2, report_to="none",
                    warmup_steps=2, lr_scheduler_kwargs={"num_decay_steps": 4, "min_lr_ratio": 0.0},
                    log_every_steps=1, eval_every_steps=5, save_every_steps=0, pad_vocab_size_to=None)
    path = data / "wsd.yaml"
    path.write_text(yaml.safe_dump(settings))
    model_args, args = parse_args(ModelArguments, TrainingArguments, argv=[str(path)])
    assert args.lr_scheduler_type == "warmup_stable_decay" and args.optim == "muon"
    pretrain(model_args, args)
    rates = [r["lr_muon"] for r in read_metrics(data / "run") if "lr_muon" in r]
    assert rates[:2] == [0.0, 0.01] and rates[2:7] == [0.02] * 5 and rates[-1] < rates[7] < 0.02  # up, hold, decay

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
import transformers
import yaml
from transformers.pytorch_utils import Conv1D

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from architectures import ARCHITECTURES, tiny_model
from timl.config import ModelArguments, OptimizerArguments, TrainingArguments, parse_args
from timl.checkpoint.manager import load_weights
from timl.loss.cross_entropy import linear_cross_entropy
from timl.model.build import build_config, build_model
from timl.optim import (LR_SCALE, build_optimizer_set, check_groups, create_optimizers, fused_adamw,
                        parameter_kinds, transposed_weight_names)
from timl.checkpoint.state import load_training_state, save_training_state
from timl.train.pretrain import pretrain
from timl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


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
    assert kinds["transformer.wte.weight"] == "embedding" and kinds["transformer.h.0.ln_1.weight"] == "bias_or_norm"
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "matrix"
    adamw_groups = optimizers["adamw"].param_groups
    no_decay = {id(p) for group in adamw_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(model.transformer.h[0].ln_1.weight) in no_decay and id(model.transformer.wte.weight) not in no_decay
    check_groups(model, list(optimizers.values()))


@pytest.fixture(scope="module")
def hf_trainer(tmp_path_factory) -> transformers.Trainer:
    """A Hugging Face Trainer, for its get_decay_parameter_names: the parameters timl must decay."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path_factory.mktemp("hf")), report_to="none",
                                          use_cpu=True)
    return transformers.Trainer(model=tiny_model("gpt2"), args=args)


def decayed_by_hf(hf_trainer: transformers.Trainer, model: torch.nn.Module) -> set[int]:
    """The parameters the Hugging Face Trainer decays. A tied weight has a name for each place it sits in."""
    names = set(hf_trainer.get_decay_parameter_names(model))
    every_name = list(model.named_parameters(remove_duplicate=False))
    decayed = {id(p) for n, p in every_name if n in names}
    assert not decayed & {id(p) for n, p in every_name if n not in names}, "a tied weight's names disagree"
    return decayed


def embeddings_of(model: torch.nn.Module) -> set[int]:
    """Every torch.nn.Embedding's weight (GPT-2's positions too) and the output head's, tied or not."""
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} | {
        id(model.get_output_embeddings().weight)}


def optimized_by(optimizer: torch.optim.Optimizer, decayed_only: bool = False) -> set[int]:
    return {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 or not decayed_only
            for p in group["params"]}


def named(model: torch.nn.Module, ids: set[int]) -> set[str]:
    """The names of these parameters, so that a failure shows which ones differ."""
    return {name for name, parameter in model.named_parameters() if id(parameter) in ids}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_adamw_decays_what_the_hf_trainer_decays_in_every_architecture(model_type, data, hf_trainer):
    model = tiny_model(model_type)
    expected = decayed_by_hf(hf_trainer, model)
    for decay_embeddings in (True, False):
        ((_, adamw),) = create_optimizers(model, tiny_args(data, decay_embeddings=decay_embeddings))
        spared = set() if decay_embeddings else embeddings_of(model)
        assert named(model, optimized_by(adamw, decayed_only=True)) == named(model, expected - spared)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_muon_takes_exactly_the_2d_hidden_matrices_in_every_architecture(model_type, data, hf_trainer):
    model = tiny_model(model_type)
    optimizers = dict(create_optimizers(model, tiny_args(data, optim="muon")))
    decayed = decayed_by_hf(hf_trainer, model)
    hidden_matrices = ({id(p) for p in model.parameters() if p.ndim == 2} & decayed) - embeddings_of(model)
    assert named(model, optimized_by(optimizers["muon"])) == named(model, hidden_matrices)
    # The rest, 3-D experts included, goes to AdamW, decayed as the Hugging Face Trainer would.
    assert named(model, optimized_by(optimizers["adamw"], decayed_only=True)) == named(model, decayed - hidden_matrices)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_stacked_expert_weights_are_decayed_by_adamw_and_never_muons(model_type, data):
    model = tiny_model(model_type)
    experts = {id(p) for n, p in model.named_parameters() if ".experts." in n and p.ndim == 3}
    assert len(experts) == 4  # gate_up_proj and down_proj [experts, ..., ...] in each of 2 layers
    ((_, adamw),) = create_optimizers(model, tiny_args(data))
    assert experts <= optimized_by(adamw, decayed_only=True)
    optimizers = dict(create_optimizers(model, tiny_args(data, optim="muon")))
    assert experts <= optimized_by(optimizers["adamw"], decayed_only=True)
    assert not experts & optimized_by(optimizers["muon"])


def test_a_custom_model_is_decayed_as_the_hf_trainer_would(data, hf_trainer):
    recipe = load_recipe("custom_gpt")
    model = recipe.GPT(recipe.GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, max_positions=16))
    ((_, adamw),) = create_optimizers(model, tiny_args(data))
    assert named(model, optimized_by(adamw, decayed_only=True)) == named(model, decayed_by_hf(hf_trainer, model))


TINY_LLAMA = ("hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,"
              "vocab_size=64,max_position_embeddings=64")


def test_an_untied_output_head_is_an_embedding_for_adamw_not_muon(data):
    """README: Muon takes the 2-D weights of the decoder blocks; AdamW the embeddings, the output head, norms and
    biases. Each parameter is placed here by its Llama name, not by timl's own sorting of the parameters."""
    model = build_model(build_config("llama", TINY_LLAMA + ",tie_word_embeddings=False,attention_bias=True"))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    blocks = ["model.layers.0.", "model.layers.1."]
    attention = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    block_matrices = {f"{block}{layer}.weight" for block in blocks
                      for layer in [*attention, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    embeddings = {"model.embed_tokens.weight", "lm_head.weight"}
    norms_and_biases = {"model.norm.weight"} | {f"{block}{name}" for block in blocks for name in
                                                ["input_layernorm.weight", "post_attention_layernorm.weight",
                                                 *(f"{layer}.bias" for layer in attention)]}
    assert {name for name, _ in model.named_parameters()} == block_matrices | embeddings | norms_and_biases
    for decay_embeddings in (True, False):
        optimizers = dict(create_optimizers(model, tiny_args(data, optim="muon", decay_embeddings=decay_embeddings)))
        assert named(model, optimized_by(optimizers["muon"])) == block_matrices
        assert named(model, optimized_by(optimizers["adamw"])) == embeddings | norms_and_biases
        decayed_by_adamw = named(model, optimized_by(optimizers["adamw"], decayed_only=True))
        assert decayed_by_adamw == (embeddings if decay_embeddings else set())


def muon_groups_by_parameter(muon: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in muon.param_groups for p in group["params"]}


def torch_muon_scale(rows: int, cols: int) -> float:
    """torch.optim.Muon's default update scale (Keller Jordan's) for a weight of shape [rows, cols]."""
    return math.sqrt(max(1, rows / cols))


def test_muon_decays_by_muon_weight_decay_and_adamw_by_weight_decay(data):
    assert OptimizerArguments.muon_weight_decay == 0.0  # modded-nanogpt's GPT-2 runs give Muon no weight decay
    model = build_model(build_config("gpt2", TINY_GPT2))
    for muon_weight_decay in (0.0, 0.01):
        optimizers = dict(create_optimizers(model, tiny_args(data, optim="muon", weight_decay=0.1,
                                                              muon_weight_decay=muon_weight_decay)))
        # torch shrinks each Muon weight by its group's lr × weight_decay a step: --muon_learning_rate × this.
        for group in optimizers["muon"].param_groups:
            assert group["lr"] * group["weight_decay"] == pytest.approx(0.02 * muon_weight_decay, abs=1e-15)
        assert {g["weight_decay"] for g in optimizers["adamw"].param_groups} == {0.1, 0.0}


def test_conv1d_weights_get_the_muon_lr_of_their_out_in_shape(data):
    model = build_model(build_config("gpt2", TINY_GPT2))
    optimizers = dict(create_optimizers(model, tiny_args(data, optim="muon")))
    groups = muon_groups_by_parameter(optimizers["muon"])
    conv1d = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8 and transposed_weight_names(model) == {n for n, p in model.named_parameters()
                                                                   if any(p is m.weight for m in conv1d)}
    for module in conv1d:
        inputs, outputs = module.weight.shape  # Conv1D stores [in, out]
        group = groups[id(module.weight)]
        # What torch applies, from the stored shape, times the group's lr must be the scale of [out, in].
        assert group["lr"] * torch_muon_scale(inputs, outputs) == pytest.approx(0.02 * torch_muon_scale(outputs,
                                                                                                         inputs))
        assert group[LR_SCALE] == pytest.approx(torch_muon_scale(outputs, inputs) / torch_muon_scale(inputs, outputs))
    # n_embd 32: c_attn [32, 96] and c_fc [32, 128] are wide as stored, mlp.c_proj [128, 32] tall, attn.c_proj square.
    block = model.transformer.h[0]
    scales = [groups[id(m.weight)][LR_SCALE] for m in (block.attn.c_attn, block.mlp.c_fc, block.mlp.c_proj)]
    assert scales == pytest.approx([math.sqrt(3), 2.0, 0.5]) and groups[id(block.attn.c_proj.weight)][LR_SCALE] == 1
    # The uncorrected group comes first: the logged lr_muon is read off it.
    assert optimizers["muon"].param_groups[0][LR_SCALE] == 1.0


def test_a_conv1d_layer_takes_the_muon_step_of_the_same_linear_layer(data):
    torch.manual_seed(0)
    stored = torch.nn.Sequential(Conv1D(48, 16), Conv1D(16, 48))  # one wide and one tall, as stored [in, out]
    linear = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.Linear(48, 16))
    with torch.no_grad():
        for conv, dense in zip(stored, linear):
            dense.weight.copy_(conv.weight.T)
            dense.bias.copy_(conv.bias)
    args = tiny_args(data, optim="muon", muon_weight_decay=0.1)
    (_, muon_stored), _ = create_optimizers(stored, args)
    (_, muon_linear), _ = create_optimizers(linear, args)
    for _ in range(3):  # momentum too
        for conv, dense in zip(stored, linear):
            gradient = torch.randn_like(conv.weight)
            conv.weight.grad, dense.weight.grad = gradient.clone(), gradient.T.clone()
        muon_stored.step()
        muon_linear.step()
    for conv, dense in zip(stored, linear):
        torch.testing.assert_close(conv.weight, dense.weight.T, rtol=1e-6, atol=1e-7)


def test_a_linear_model_keeps_torchs_muon_scaling(data):
    model = build_model(build_config("llama", TINY_LLAMA))
    optimizers = dict(create_optimizers(model, tiny_args(data, optim="muon")))
    kinds = parameter_kinds(model)
    assert transposed_weight_names(model) == set()
    (group,) = optimizers["muon"].param_groups
    assert group["lr"] == 0.02 and group[LR_SCALE] == 1.0 and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for n, p in model.named_parameters() if kinds[n] == "matrix"}


def test_adamw_is_fused_on_cuda_and_never_on_the_cpu(data):
    for optim in ("adamw_torch", "adamw_torch_fused", "muon"):
        assert not fused_adamw(optim, "cpu") and not fused_adamw(optim, torch.device("cpu"))
        assert fused_adamw(optim, torch.device("cuda", 0)) == fused_adamw(optim, "cuda") == (optim != "adamw_torch")
    # The model is on the CPU: the device it will train on decides, not where it is while the optimizers are built
    # (torch checks a fused AdamW's parameters at its first step, not when it is built).
    model = build_model(build_config("gpt2", TINY_GPT2))
    for optim in ("adamw_torch_fused", "muon"):
        args = tiny_args(data, optim=optim)
        assert dict(create_optimizers(model, args, device=torch.device("cuda")))["adamw"].defaults["fused"]
        assert not dict(create_optimizers(model, args, device="cpu"))["adamw"].defaults["fused"]
        assert not dict(create_optimizers(model, args))["adamw"].defaults["fused"]  # by default, where it is
        built = build_optimizer_set(model, args, total_steps=4, given=[(None, None)], device=torch.device("cuda"))
        assert built.optimizers[built.names.index("adamw")].defaults["fused"]


def test_schedules_scale_each_group_from_its_own_initial_lr(data):
    model = build_model(build_config("gpt2", TINY_GPT2))
    args = tiny_args(data, optim="muon", lr_scheduler_type="cosine", warmup_steps=2)
    optim = build_optimizer_set(model, args, total_steps=8, given=[(None, None)], device="cpu")
    muon, adamw = optim.optimizers
    assert [g["initial_lr"] for g in muon.param_groups] == [0.02 * g[LR_SCALE] for g in muon.param_groups]
    assert {g["initial_lr"] for g in adamw.param_groups} == {args.learning_rate}
    for step in range(8):
        factor = optim.schedulers[0].lr_lambdas[0](step)
        for optimizer in optim.optimizers:
            for group in optimizer.param_groups:
                assert group["lr"] == pytest.approx(group["initial_lr"] * factor, abs=1e-15)
        rates = optim.learning_rates()
        assert rates == pytest.approx({"lr": 6e-4 * factor, "lr_muon": 0.02 * factor, "lr_adamw": 6e-4 * factor})
        for optimizer, scheduler in zip(optim.optimizers, optim.schedulers):
            optimizer.step()  # no gradients: nothing moves, but the schedulers see a step
            scheduler.step()


def test_warmup_ratio_rounds_its_share_of_the_steps_up_as_transformers_does(tmp_path):
    # transformers 5 has no warmup_ratio: a warmup_steps below 1 is the ratio, rounded up to whole steps.
    hf_args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                             warmup_steps=0.01)
    assert (hf_args.get_warmup_steps(150), hf_args.get_warmup_steps(1)) == (2, 1)

    def first_rates(total_steps: int, count: int) -> list[float]:
        """The learning rates of the first steps, as a run logs them, at 1% warm-up on the default cosine."""
        optim = build_optimizer_set(torch.nn.Linear(4, 4), OptimizerArguments(warmup_ratio=0.01), total_steps,
                                    given=[(None, None)])
        rates = []
        for _ in range(count):
            rates.append(optim.learning_rates()["lr"])
            optim.step(torch.tensor(False))  # no gradients: only the schedule moves
        return rates

    # Two warm-up steps rise linearly from 0 to the peak (6e-4), which the cosine starts at; rounded down, the
    # second step would already train at the peak.
    assert first_rates(150, 3) == pytest.approx([0.0, 3e-4, 6e-4], abs=1e-12)
    assert first_rates(1, 1) == [0.0]  # as transformers does: a 1-step run warms up over its one step


def test_the_logged_muon_rate_is_uncorrected_without_a_plain_group(data):
    model = torch.nn.Sequential(Conv1D(48, 16))  # only a corrected group
    optim = build_optimizer_set(model, tiny_args(data, optim="muon"), total_steps=4, given=[(None, None)])
    assert optim.optimizers[0].param_groups[0][LR_SCALE] == pytest.approx(math.sqrt(3))
    assert optim.learning_rates() == pytest.approx({"lr": 6e-4, "lr_muon": 0.02, "lr_adamw": 6e-4})
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    single = build_optimizer_set(model, tiny_args(data), total_steps=4, given=[(sgd, None)])
    assert single.learning_rates() == {"lr": 0.1}


def test_a_muon_checkpoint_restores_every_group_and_continues_alike(data, tmp_path):
    args = tiny_args(data, optim="muon", muon_weight_decay=0.01, warmup_steps=1)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))

    def build(seed):
        torch.manual_seed(seed)
        model = build_model(build_config("gpt2", TINY_GPT2))
        return model, build_optimizer_set(model, args, total_steps=6, given=[(None, None)], device="cpu")

    def step(model, optim):
        logits = model(input_ids=tokens[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        for optimizer, scheduler in zip(optim.optimizers, optim.schedulers):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    def hyperparameters(optimizer):
        return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]

    model, optim = build(0)
    for _ in range(2):
        step(model, optim)
    save_training_state(tmp_path / "step2", model=model, optimizers=optim.optimizers, schedulers=optim.schedulers)
    fresh_model, fresh = build(1)
    load_training_state(tmp_path / "step2", model=fresh_model, optimizers=fresh.optimizers,
                        schedulers=fresh.schedulers)
    for saved, loaded in zip(optim.optimizers, fresh.optimizers):
        assert hyperparameters(loaded) == hyperparameters(saved)
    assert [s.state_dict() for s in fresh.schedulers] == [s.state_dict() for s in optim.schedulers]
    assert fresh.learning_rates() == optim.learning_rates()
    step(model, optim)
    step(fresh_model, fresh)
    for (name, parameter), loaded in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(parameter, loaded), name

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
    # lr is AdamW's (--learning_rate), never Muon's under another name.
    assert latest["lr_muon"] == 0.02 and latest["lr_adamw"] == 3e-3 and latest["lr"] == 3e-3
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
    from timl.config import TrainingArguments
    from timl.model.build import build_config, build_model
    from timl.train.trainer import Trainer
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
                            text=True, timeout=600)
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
                    max_eval_tokens=None, torch_compile="false", config_overrides=TINY_GPT2, report_to="none",
                    warmup_steps=2, lr_scheduler_kwargs={"num_decay_steps": 4, "min_lr_ratio": 0.0},
                    log_every_steps=1, eval_every_steps=5, save_every_steps=0, pad_vocab_size_to="none")
    path = data / "wsd.yaml"
    path.write_text(yaml.safe_dump(settings))
    model_args, args = parse_args(ModelArguments, TrainingArguments, argv=[str(path)])
    assert args.lr_scheduler_type == "warmup_stable_decay" and args.optim == "muon"
    pretrain(model_args, args)
    rates = [r["lr_muon"] for r in read_metrics(data / "run") if "lr_muon" in r]
    assert rates[:2] == [0.0, 0.01] and rates[2:7] == [0.02] * 5 and rates[-1] < rates[7] < 0.02  # up, hold, decay

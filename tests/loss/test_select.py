"""The loss selector: it alone decides the loss path, and each path computes its cross-entropy and z-loss once."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from conftest import TINY_GPT2
from timl.loss.select import choose_training_loss
from timl.model.forward import TrainingLoss
from timl.model.build import build_config, build_model
from timl.model.forward import CausalLMForTraining
from timl.model.head import Head, read_head
from timl.train.trainer import Trainer
from uneven_batches import UnevenLoader, train_args

VOCAB = 64
CPU = torch.device("cpu")
NORMALISING = {"logsumexp", "log_softmax", "softmax", "cross_entropy"}
TARGET_PICKING = {"gather", "take_along_dim", "nll_loss", "cross_entropy"}


class VocabPasses(TorchFunctionMode):
    """Counts, among the torch calls on tensors whose last dimension is the vocab, those that normalise the logits
    (a logsumexp, a softmax, a cross-entropy) and those that pick each token's target logit: one of each is one
    cross-entropy with its z-loss."""

    def __init__(self) -> None:
        super().__init__()
        self.normalising = self.target_picking = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dim() >= 2 and first.shape[-1] == VOCAB:
            self.normalising += name in NORMALISING
            self.target_picking += name in TARGET_PICKING
        return func(*args, **(kwargs or {}))


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(build_config("gpt2", TINY_GPT2)).eval()


def batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=generator)
    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100
    return {"input_ids": tokens[:, :-1], "labels": labels}, (labels != -100).sum().float()


def reference_losses(model: torch.nn.Module, inputs: dict[str, torch.Tensor], coefficient: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and z-loss of the model's own logits, computed apart from timl."""
    logits = model(input_ids=inputs["input_ids"]).logits.flatten(0, 1).float()
    labels = inputs["labels"].flatten()
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    z_loss = coefficient * (logits.logsumexp(-1).square() * (labels != -100)).sum()
    return cross_entropy, z_loss


@pytest.mark.parametrize("path", ["logits", "full", "chunked"])
def test_each_path_with_z_loss_computes_its_cross_entropy_once(path):
    """The logits path once computed the whole cross-entropy a second time for the z-loss."""
    model, (inputs, count) = tiny_gpt2(), batch()
    loss = TrainingLoss(path, None if path == "logits" else read_head(model), z_loss_coefficient=0.1)
    training = CausalLMForTraining(model, loss, {}, return_outputs=False)
    with VocabPasses() as passes:
        total, z_loss, _ = training(inputs, count)
    assert (passes.normalising, passes.target_picking) == (1, 1)
    cross_entropy, expected_z_loss = reference_losses(model, inputs, 0.1)
    assert total.item() == pytest.approx(((cross_entropy + expected_z_loss) / count).item(), rel=1e-5)
    assert z_loss.item() == pytest.approx((expected_z_loss / count).item(), rel=1e-5)


def logit_penalty(outputs, inputs, num_items_in_batch):
    """A user's loss on the logits that is no cross-entropy."""
    return outputs.logits.float().square().sum() / num_items_in_batch


@pytest.mark.parametrize("coefficient", [0.0, 0.1])
def test_a_custom_loss_on_the_logits_gets_the_z_loss_added_and_no_cross_entropy(coefficient):
    model, (inputs, count) = tiny_gpt2(), batch()
    loss = choose_training_loss(model, "auto", CPU, {}, compute_loss_func=logit_penalty,
                                z_loss_coefficient=coefficient)
    assert loss.path == "logits"
    training = CausalLMForTraining(model, loss, {}, return_outputs=False)
    with VocabPasses() as passes:
        total, z_loss, _ = training(inputs, count)
    assert (passes.normalising, passes.target_picking) == (1 if coefficient else 0, 0)
    _, expected_z_loss = reference_losses(model, inputs, coefficient)
    penalty = model(input_ids=inputs["input_ids"]).logits.float().square().sum()
    assert total.item() == pytest.approx(((penalty + expected_z_loss) / count).item(), rel=1e-5)
    assert z_loss.item() == pytest.approx((expected_z_loss / count).item(), rel=1e-5, abs=1e-12)


def test_what_needs_the_logits_sends_auto_to_them_and_a_named_head_path_is_refused(caplog):
    model = tiny_gpt2()
    assert choose_training_loss(model, "auto", CPU, {}).path == "full"
    assert choose_training_loss(model, "auto", CPU, {}, compute_loss_func=logit_penalty).path == "logits"
    assert choose_training_loss(model, "auto", CPU, {}, train_metrics=True).path == "logits"
    assert choose_training_loss(model, "auto", CPU, {}, fp8_output_head=True).path == "logits"
    with pytest.raises(ValueError, match="The full loss path makes no logits, which the custom compute_loss_func "
                                         "needs: drop one of them"):
        choose_training_loss(model, "full", CPU, {}, compute_loss_func=logit_penalty)
    with caplog.at_level(logging.WARNING):
        named = choose_training_loss(model, "full", CPU, {}, train_metrics=True)
    assert named.path == "full" and "so train metrics are skipped" in caplog.text
    with pytest.raises(ValueError, match="Unknown loss path 'fastest'"):
        choose_training_loss(model, "fastest", CPU, {})


def test_a_model_with_dropout_in_training_mode_passes_the_head_probe(caplog):
    """GPT-2's default dropout (0.1) is on in training mode, where two forwards differ. The probe must run in eval
    mode: else the head fails it, training falls back to the logits path and the GPU loses the chunked head's memory
    saving, with the loss still exact and only a warning to tell."""
    torch.manual_seed(0)
    model = build_model(build_config("gpt2", TINY_GPT2 + ",resid_pdrop=0.1,embd_pdrop=0.1,attn_pdrop=0.1"))
    assert model.training
    # The selector reads only the device's type (the probe runs where the weights are), so a CUDA device asks for
    # the GPU's choice on the CPU.
    with caplog.at_level(logging.WARNING, logger="timl.loss.select"):
        on_gpu = choose_training_loss(model, "auto", torch.device("cuda"), {})
        on_cpu = choose_training_loss(model, "auto", CPU, {})
    assert (on_gpu.path, on_gpu.head) == ("chunked", Head()) and (on_cpu.path, on_cpu.head) == ("full", Head())
    assert [record.getMessage() for record in caplog.records if record.name == "timl.loss.select"] == []
    assert all(module.training for module in model.modules())


def test_a_fused_kernels_options_go_to_its_path_only(monkeypatch):
    model = tiny_gpt2()
    monkeypatch.setattr("timl.loss.select.fused_kernel_missing", lambda path, device: None)
    options = {"impl": "cce"}
    chosen = choose_training_loss(model, "cut_cross_entropy", CPU, {}, cut_cross_entropy_kwargs=options)
    assert (chosen.path, chosen.head, chosen.options) == ("cut_cross_entropy", Head(), options)
    assert choose_training_loss(model, "full", CPU, {}, cut_cross_entropy_kwargs=options).options == {}


def trainer_for(tmp_path, requested: str, **trainer_arguments) -> Trainer:
    args = train_args(tmp_path, loss_implementation=requested, z_loss_coefficient=1e-3)
    return Trainer(tiny_gpt2(), args, train_loader_factory=UnevenLoader, **trainer_arguments)


@pytest.mark.parametrize(("requested", "custom_loss"), [("auto", False), ("logits", False), ("full", False),
                                                        ("auto", True)])
def test_the_trainer_trains_on_what_the_selector_chooses(tmp_path, requested, custom_loss):
    trainer = trainer_for(tmp_path, requested, compute_loss_func=logit_penalty if custom_loss else None)
    expected = choose_training_loss(tiny_gpt2(), requested, CPU, {}, z_loss_coefficient=1e-3,
                                    compute_loss_func=logit_penalty if custom_loss else None)
    assert trainer.training_loss == expected
    assert expected.path == {"auto": "logits" if custom_loss else "full"}.get(requested, requested)
    assert trainer.accelerator.unwrap_model(trainer.training_model).loss is trainer.training_loss


def test_the_trainer_makes_no_loss_decision_of_its_own(tmp_path, monkeypatch):
    """Whatever the selector says goes, even a head path with a custom loss and train metrics."""
    asked = {}
    chosen = TrainingLoss("chunked", Head())

    def selector(model, requested, device, forward_kwargs, **arguments):
        asked.update(requested=requested, **arguments)
        return chosen

    monkeypatch.setattr("timl.train.trainer.choose_training_loss", selector)
    trainer = trainer_for(tmp_path, "logits", compute_loss_func=logit_penalty, train_metrics=[object()])
    assert trainer.training_loss is chosen
    assert trainer.accelerator.unwrap_model(trainer.training_model).loss is chosen
    assert not trainer.train_metrics_on
    assert asked["requested"] == "logits" and asked["compute_loss_func"] is logit_penalty
    assert asked["train_metrics"] and asked["z_loss_coefficient"] == 1e-3

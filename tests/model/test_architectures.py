"""Any causal LM trains on exactly its own loss: the architecture matrix, on the CPU, in fp32, compile off.

Each family is built from a tiny config, as a user would with `--model_name <type> --config_overrides ...`. Where
the head does more than a matmul (a bias, a logit scale, a softcap), the tiny config makes that part large, so that
a loss path ignoring it would be far off.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from architectures import ARCHITECTURES, tiny_model, tiny_values
from conftest import read_metrics, write_learnable_shards
from timl.config import ModelArguments, TrainingArguments
from timl.loss.select import choose_training_loss
from timl.model.forward import TrainingLoss
from timl.model.build import build_config
from timl.model.forward import CausalLMForTraining
from timl.model.head import output_layer, read_head
from timl.train.pretrain import make_model
from timl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
def own_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own cross-entropy on already-shifted labels, computed apart from timl."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 17), generator=generator)
    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100
    return {"input_ids": tokens[:, :-1], "labels": labels}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_each_family_built_through_config_overrides_saves_with_one_entry_per_layer(model_type, tmp_path):
    """The tiny sizes as a user gives them, in --config_overrides: the per-layer lists the family derives from its
    layer count (layer_types, ...) follow the new count, so the config saves and reloads."""
    default = AutoConfig.for_model(model_type)
    # Only values where the default config holds a number or a string: all that update_from_string can set.
    overrides = ",".join(f"{name}={value}" for name, value in tiny_values(model_type).items()
                         if value is not None and isinstance(getattr(default, name, None), (int, float, str)))
    build_config(model_type, overrides).save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    assert saved.num_hidden_layers == 2
    per_layer = [name for name, value in default.to_dict().items()
                 if isinstance(value, list) and len(value) == default.num_hidden_layers]
    for name in per_layer:
        assert len(getattr(saved, name)) == 2, name


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_cpu_loss_path_gives_the_models_own_loss_and_gradients(model_type):
    model = tiny_model(model_type).eval()  # eval: the paths are compared on the same function, dropout aside
    inputs = batch()
    count = (inputs["labels"] != -100).sum().float()
    expected = own_loss(model, inputs["input_ids"], inputs["labels"]) / count
    expected.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    chosen = choose_training_loss(model, "auto", torch.device("cpu"), {})
    assert chosen.path == "full" and chosen.head == read_head(model)
    on_gpu = choose_training_loss(model, "auto", torch.device("cuda"), {})
    assert (on_gpu.path, on_gpu.head) == ("chunked", chosen.head)  # a GPU's default
    for path in ("logits", "full", "chunked"):
        model.zero_grad()
        training = CausalLMForTraining(model, TrainingLoss(path, None if path == "logits" else chosen.head), {},
                                       return_outputs=False)
        loss = training(inputs, count)[0]
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), path
        loss.backward()
        for name, grad in reference.items():
            got = dict(model.named_parameters())[name].grad
            assert (got - grad).norm() <= 1e-4 * grad.norm() + 1e-7, (path, name)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_each_family_trains_saves_and_reloads_with_its_logged_losses_exact(model_type, tmp_path):
    """Step 1's train loss is the model's own loss on the first batch; the final logged eval loss is an independent
    cross-entropy of the reloaded main/ over every eval token."""
    train_stream = write_learnable_shards(tmp_path, 2048, "train")
    eval_stream = write_learnable_shards(tmp_path, 320, "validation", seed=1)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"),
                             eval_file_pattern=str(tmp_path / "validation_*.bin"), block_size=16, train_batch_size=4,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, max_train_steps=3,
                             log_every_steps=1, eval_every_steps=0, save_every_steps=0, report_to="none",
                             optim="adamw_torch", learning_rate=1e-2, bf16=False)
    model = tiny_model(model_type)
    initial = copy.deepcopy(model).eval()
    Trainer(model, args).train()

    first = torch.from_numpy(train_stream[: 4 * 16 + 1].astype(np.int64))
    with torch.no_grad():
        expected = own_loss(initial, first[:-1].view(4, 16), first[1:].view(4, 16)) / (4 * 16)
    records = read_metrics(tmp_path / "run")
    step_one = next(r for r in records if r["step"] == 1)
    assert step_one["train_loss"] == pytest.approx(expected.item(), rel=1e-5)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "main").eval()
    tokens = torch.from_numpy(eval_stream.astype(np.int64))
    targets = torch.cat([tokens[1:], torch.tensor([-100])])
    with torch.no_grad():
        independent = own_loss(reloaded, tokens.view(-1, 16), targets.view(-1, 16)) / (len(tokens) - 1)
    logged = [r for r in records if "eval_loss" in r][-1]
    assert logged["step"] == 3 and logged["eval_loss"] == pytest.approx(independent.item(), rel=1e-5)
    if output_layer(model)[1] is not None:  # Phi: the head's bias is trained too
        assert not torch.equal(output_layer(reloaded)[1], output_layer(initial)[1])


class DoubledLogits(torch.nn.Module):
    """A causal LM whose head does something timl cannot know: it doubles its logits outside the output layer."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.base_model_prefix = "inner"

    @property
    def base_model(self) -> torch.nn.Module:
        return self.inner.model

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.lm_head

    def forward(self, input_ids: torch.Tensor, **kwargs):
        outputs = self.inner(input_ids=input_ids, **kwargs)
        outputs.logits = outputs.logits * 2
        return outputs


def test_a_head_timl_cannot_reproduce_trains_on_the_models_own_logits_and_says_so(caplog):
    model = DoubledLogits(tiny_model("llama"))
    with caplog.at_level(logging.WARNING):
        chosen = choose_training_loss(model, "chunked", torch.device("cpu"), {})
    assert (chosen.path, chosen.head) == ("logits", None)
    assert "Training on the model's own logits, not the chunked loss path" in caplog.text
    inputs = batch()
    count = (inputs["labels"] != -100).sum().float()
    training = CausalLMForTraining(model, chosen, {}, return_outputs=False).eval()
    with torch.no_grad():
        assert training(inputs, count)[0].item() == pytest.approx(
            (own_loss(model, inputs["input_ids"], inputs["labels"]) / count).item(), rel=1e-6)


def test_gemma2_builds_from_its_model_type_with_no_attention_flag():
    """Gemma-2 refuses sdpa in transformers 5: left unset, the attention is what transformers picks for it."""
    args = TrainingArguments(block_size=16, report_to="none")
    model = make_model(ModelArguments(model_name="gemma2", config_overrides=(
        "vocab_size=64,hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,"
        "num_key_value_heads=2,head_dim=8")), args)
    assert model.config.model_type == "gemma2" and model.config._attn_implementation != "sdpa"


def test_an_attention_a_model_refuses_gets_an_error_naming_the_flag():
    args = TrainingArguments(block_size=16, report_to="none")
    with pytest.raises(ValueError, match="--attn_implementation flash_attention_2"):
        make_model(ModelArguments(model_name="llama", attn_implementation="flash_attention_2", config_overrides=(
            "vocab_size=64,hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4")), args)


def test_from_pretrained_starts_from_the_saved_weights(tmp_path):
    saved = tiny_model("qwen2")
    saved.save_pretrained(tmp_path / "qwen")
    loaded = make_model(ModelArguments(from_pretrained=str(tmp_path / "qwen")), TrainingArguments(block_size=16))
    for (name, expected), got in zip(saved.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, got), name
    fresh = make_model(ModelArguments(model_name=str(tmp_path / "qwen")), TrainingArguments(block_size=16, seed=1))
    assert not torch.equal(fresh.lm_head.weight, saved.lm_head.weight)  # --model_name: its config, fresh weights


def test_weights_asked_for_offline_and_not_cached_get_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_cache"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "gpt2_c4.py"), "--from_pretrained",
                             "nobody/no-such-model", "--output_dir", str(tmp_path / "run"), "--report_to", "none"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "--from_pretrained 'nobody/no-such-model': not a local folder" in result.stderr
    assert "Offline, download it beforehand" in result.stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=512, pad_token_id=None, bos_token_id=0,
                 eos_token_id=0)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_loss_paths_under_compile_match_an_fp32_reference_on_the_gpu(model_type):
    """Each loss path, compiled with the model under bf16 autocast, against the fp32 eager model's own loss.
    The bound is the issue's (forward 1e-3, gradients 1e-2) or, where bf16 through the decoder alone costs more,
    1.5 times what the logits path itself shows."""
    import json
    import os

    paths = ["logits", "full", "chunked"] + [name for name, package in (("liger", "liger_kernel"),
                                             ("cut_cross_entropy", "cut_cross_entropy"))
                                             if importlib.util.find_spec(package)]
    extra = {"gemma2": dict(final_logit_softcapping=30.0, sliding_window=256)}.get(model_type, {})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **GPU_SHAPE, **extra)).cuda()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32000, (4, 257), generator=generator).cuda()
    inputs = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()}
    inputs["labels"][:, ::50] = -100
    count = (inputs["labels"] != -100).sum().float()

    def run(path: str | None):
        model.zero_grad()
        torch._dynamo.reset()
        if path is None:  # the fp32 eager reference: the model's own logits
            loss = own_loss(model, inputs["input_ids"], inputs["labels"]) / count
        else:
            chosen = choose_training_loss(model, path, torch.device("cuda"), {})
            assert chosen.path == path
            training = torch.compile(CausalLMForTraining(model, chosen, {}, return_outputs=False))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = training(inputs, count)[0]
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        return loss.item(), grads

    reference_loss, reference_grads = run(None)
    errors = {}
    for path in paths:
        loss, grads = run(path)
        errors[path] = (abs(loss - reference_loss) / reference_loss,
                        ((grads - reference_grads).norm() / reference_grads.norm()).item())
    if os.environ.get("TIML_KERNEL_REPORT"):
        with open(os.environ["TIML_KERNEL_REPORT"], "a") as file:
            for path, (forward, grad) in errors.items():
                file.write(json.dumps({"model": model_type, "path": path, "forward": forward, "grad": grad}) + "\n")
    for path, (forward, grad) in errors.items():
        assert forward <= max(1e-3, 1.5 * errors["logits"][0]), (path, errors)
        assert grad <= max(1e-2, 1.5 * errors["logits"][1]), (path, errors)

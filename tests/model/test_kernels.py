"""Loss paths and vocab padding: exact on the CPU, and against an fp32 reference on the GPU. Which layers FP8 converts,
and with which scaling: on the CPU, since only the FP8 forward needs a GPU."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

from architectures import tiny_config, tiny_model
from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.config import ModelArguments, TrainingArguments
from timl.loss.cross_entropy import linear_cross_entropy
from timl.loss.select import choose_training_loss, fused_kernel_missing
from timl.model.forward import TrainingLoss, head_loss
from timl.model.build import build_config, build_model, pad_vocab
from timl.model.forward import CausalLMForTraining
from timl.model.head import Head
from timl.model.kernels import apply_liger, convert_to_fp8, fp8_module_filter
from timl.train.pretrain import pretrain

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_padded_rows_get_no_probability_mass_and_no_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(40, 16)
    weight = torch.randn(64, 16, requires_grad=True)
    labels = torch.randint(0, 60, (40,))
    labels[3] = -100
    padded, _ = linear_cross_entropy(hidden, weight, labels, vocab_size=60)
    padded.backward()
    reference = F.cross_entropy(hidden @ weight[:60].T, labels, ignore_index=-100, reduction="sum")
    assert padded.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.all(weight.grad[60:] == 0) and torch.any(weight.grad[:60] != 0)


def test_the_fused_torch_path_equals_the_logits_path_of_the_same_model():
    torch.manual_seed(0)
    model = build_model(build_config("gpt2", TINY_GPT2))
    inputs = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    count = torch.tensor(32.0)
    fused = CausalLMForTraining(model, TrainingLoss("full", Head()), {}, return_outputs=False)(inputs, count)[0]
    plain = CausalLMForTraining(model, TrainingLoss("logits"), {}, return_outputs=False)(inputs, count)[0]
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)


def test_pad_vocab_states_both_sizes_in_the_config():
    model = build_model(build_config("gpt2", TINY_GPT2.replace("vocab_size=64", "vocab_size=60")))
    pad_vocab(model, 64)
    assert model.config.vocab_size == 64 and model.config.unpadded_vocab_size == 60
    assert model.get_output_embeddings().weight.shape[0] == 64


@pytest.mark.parametrize("path", ["liger", "cut_cross_entropy"])
def test_a_fused_kernel_without_cuda_falls_back_to_the_default_path_and_says_so(path, caplog):
    assert fused_kernel_missing(path, torch.device("cpu")) is not None
    model = build_model(build_config("gpt2", TINY_GPT2))
    with caplog.at_level(logging.WARNING):
        chosen = choose_training_loss(model, path, torch.device("cpu"), {})
    assert (chosen.path, chosen.head) == ("full", Head())
    assert "training on the default loss path instead" in caplog.text


def test_training_on_a_padded_vocab_saves_the_padded_config_and_evaluates_the_real_vocab(tmp_path):
    from transformers import AutoModelForCausalLM

    write_learnable_shards(tmp_path, 4096, "train")
    eval_stream = write_learnable_shards(tmp_path, 640, "validation", seed=1)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"),
                             eval_file_pattern=str(tmp_path / "validation_*.bin"), block_size=16, train_batch_size=8,
                             per_device_train_batch_size=8, per_device_eval_batch_size=4, max_train_steps=3,
                             report_to="none", optim="adamw_torch", pad_vocab_size_to=48, bf16=False)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args)
    config = json.loads((tmp_path / "run" / "main" / "config.json").read_text())
    assert config["vocab_size"] == 96 and config["unpadded_vocab_size"] == 64
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "main").eval()
    tokens = torch.tensor(eval_stream.astype("int64"))
    with torch.no_grad():
        logits = model(input_ids=tokens.view(-1, 16)).logits[..., :64]
    targets = torch.cat([tokens[1:], torch.tensor([-100])])
    expected = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-100).item()
    logged = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r][-1]["eval_loss"]
    assert logged == pytest.approx(expected, rel=1e-5)



# Sizes FP8's matmul cannot take, each on one side: gate_proj and up_proj put out 40, down_proj takes 40 in, and one
# key/value head of 8 makes k_proj and v_proj put out 8. Only the attention's q_proj and o_proj (32 by 32) are left.
LLAMA_FP8_LAYERS = [f"model.layers.{layer}.self_attn.{name}" for layer in range(2) for name in ("q_proj", "o_proj")]
FP8_CASES = [  # family, vocab size, output head asked for, the layers that convert
    ("llama", 64, False, LLAMA_FP8_LAYERS),
    ("llama", 64, True, [*LLAMA_FP8_LAYERS, "lm_head"]),
    ("llama", 60, True, LLAMA_FP8_LAYERS),  # a head of 60 rows stays in bf16 even when asked for
    ("gpt2", 64, False, []),  # GPT-2's decoder is transformers' Conv1D, not torch.nn.Linear
    ("gpt2", 64, True, ["lm_head"]),
]


def fp8_test_model(family: str, vocab_size: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config.vocab_size = vocab_size
    if family == "llama":
        config.intermediate_size, config.num_key_value_heads = 40, 1
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(("family", "vocab_size", "output_head", "expected"), FP8_CASES)
def test_the_fp8_filter_picks_linear_layers_fp8_can_take_and_the_head_only_when_asked(family, vocab_size,
                                                                                        output_head, expected):
    model = fp8_test_model(family, vocab_size)
    convertible = fp8_module_filter(model, output_head)
    assert [name for name, module in model.named_modules() if convertible(module, name)] == expected


def test_an_fp8_head_is_refused_for_a_model_without_a_linear_head():
    with pytest.raises(ValueError, match="output head is missing, not a torch.nn.Linear"):
        fp8_module_filter(torch.nn.Sequential(torch.nn.Linear(32, 32)), output_head=True)


@pytest.mark.parametrize("output_head", [False, True])
def test_fp8_refuses_a_model_with_no_decoder_layer_it_can_take(output_head):
    """GPT-2's decoder is Conv1D: converting its head alone, or nothing, would train it in bf16 while saying FP8."""
    with pytest.raises(ValueError, match="--fp8 tensorwise: GPT2LMHeadModel has no layer in its decoder that FP8"):
        convert_to_fp8(fp8_test_model("gpt2", 64), "tensorwise", output_head)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize(("family", "vocab_size", "output_head", "expected"),
                         [case for case in FP8_CASES if case[0] != "gpt2"])
def test_fp8_converts_exactly_the_chosen_layers_with_the_recipes_scaling(family, vocab_size, output_head, expected,
                                                                        recipe):
    pytest.importorskip("torchao.float8")
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_linear import Float8Linear

    model = fp8_test_model(family, vocab_size)
    linear_layers = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    assert convert_to_fp8(model, recipe, output_head) == expected
    modules = dict(model.named_modules())
    assert [name for name in linear_layers if type(modules[name]) is Float8Linear] == expected
    assert all(type(modules[name]) is torch.nn.Linear for name in linear_layers if name not in expected)
    # Rowwise scales each row of a tensor on its own (torchao calls that axiswise), tensorwise the whole of it.
    granularity = {"tensorwise": ScalingGranularity.TENSORWISE, "rowwise": ScalingGranularity.AXISWISE}[recipe]
    for name in expected:
        config = modules[name].config
        assert config.cast_config_input.scaling_granularity == granularity
        assert config.cast_config_weight.scaling_granularity == granularity
    # A converted head tied to the input embedding must still train that one weight.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == model.config.tie_word_embeddings


@pytest.fixture
def liger_patches_undone(monkeypatch):
    """Liger patches the transformers modeling modules themselves (Llama's rotary function and classes); every
    attribute of them is set back after the test, so later tests in this process build the stock model."""
    from transformers.models.llama import modeling_llama

    for name, value in list(vars(modeling_llama).items()):
        monkeypatch.setattr(modeling_llama, name, value)


@pytest.mark.parametrize(("kwargs", "patched"), [({}, "rope, rms_norm, swiglu"),
                                                 ({"swiglu": False, "fused_linear_cross_entropy": True,
                                                   "layer_norm": True}, "rope, rms_norm")])
def test_liger_patches_the_modules_of_a_model_it_knows_and_never_its_loss(liger_patches_undone, kwargs, patched):
    """Liger's own patch for the model type, with timl's loss kept: a fused loss asked for in the kwargs is dropped,
    as is an argument the patch does not take. Only the patch is checked here: Liger's kernels need a GPU."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    model = tiny_model("llama")
    stock_forward = type(model).forward
    assert apply_liger(model, kwargs) == [f"liger for llama: {patched}"]
    assert model.forward.__func__ is stock_forward  # the loss is still timl's, through the model's own forward
    layer = model.model.layers[0]
    assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
    assert (layer.mlp._get_name() == "LigerSwiGLUMLP") == ("swiglu" in patched)


def test_liger_layer_norm_replaces_gpt2s_only_when_asked_and_keeps_the_same_parameters():
    model = tiny_model("gpt2")
    assert apply_liger(model, {}) == [] and not any("Liger" in type(m).__name__ for m in model.modules())
    before = {name: parameter for name, parameter in model.named_parameters()}
    assert apply_liger(model, {"layer_norm": True}) == ["liger LayerNorm x5"]  # two per block, and the last one
    norms = [name for name, module in model.named_modules() if type(module).__name__ == "LigerLayerNorm"]
    assert norms == ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
                     "transformer.ln_f"]
    # The very tensors: the optimizer, the checkpoint and the tied weights see no change.
    assert all(parameter is before[name] for name, parameter in model.named_parameters())
    assert set(dict(model.named_parameters())) == set(before)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("vocab", "rows"), [(50257, 50257), (50304, 50304), (50257, 50304)])
@pytest.mark.parametrize("path", ["full", "full_compiled", "chunked", "chunked_compiled", "cut_cross_entropy",
                                  "cut_cross_entropy:cce", "liger"])
def test_loss_paths_match_an_fp32_reference_on_the_gpu(path, vocab, rows):
    """rows > vocab: a padded output embedding, whose extra rows must get no probability mass."""
    name, _, impl = path.partition(":")
    if name in ("cut_cross_entropy", "liger"):
        pytest.importorskip(name if name != "liger" else "liger_kernel")
    errors = {"forward": 0.0, "grad_hidden": 0.0, "grad_weight": 0.0}
    for draw in range(2):  # the worse of two fresh draws
        torch.manual_seed(draw)
        hidden = torch.randn(8192, 768, device="cuda", dtype=torch.bfloat16)
        weight = (torch.randn(rows, 768, device="cuda") * 0.02).to(torch.bfloat16)
        labels = torch.randint(0, vocab, (8192,), device="cuda")
        labels[::100] = -100
        reference_h, reference_w = hidden.float().requires_grad_(), weight.float().requires_grad_()
        reference = F.cross_entropy(reference_h @ reference_w[:vocab].T, labels, ignore_index=-100, reduction="sum")
        reference.backward()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        function = torch.compile(head_loss) if name.endswith("_compiled") else head_loss
        loss, _ = function(h, w, labels, vocab_size=vocab, path=name.removesuffix("_compiled"),
                           options={"impl": impl} if impl else {})
        loss.backward()
        relative = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
        errors["forward"] = max(errors["forward"], abs(loss.item() - reference.item()) / abs(reference.item()))
        errors["grad_hidden"] = max(errors["grad_hidden"], relative(h.grad, reference_h.grad))
        errors["grad_weight"] = max(errors["grad_weight"], relative(w.grad, reference_w.grad))
        assert torch.all(w.grad[vocab:] == 0)
        # Small weights make nearly uniform logits: the mean loss starts at about ln(vocab).
        assert loss.item() / (labels != -100).sum().item() == pytest.approx(math.log(vocab), rel=0.02)
    if os.environ.get("TIML_KERNEL_REPORT"):
        with open(os.environ["TIML_KERNEL_REPORT"], "a") as file:
            file.write(json.dumps({"path": path, "vocab": vocab, "rows": rows, **errors}) + "\n")
    assert errors["forward"] <= 1e-3
    if impl != "cce":  # CCE's own kernel is measured and published, not the default: it filters gradients
        assert errors["grad_hidden"] <= 1e-2 and errors["grad_weight"] <= 1e-2

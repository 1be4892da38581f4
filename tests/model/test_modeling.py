"""Training-time model options: activation checkpointing, regional compilation, FP8's refusal without FP8 hardware;
and configs built with --config_overrides that transformers will save."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.config.arguments import TrainingArguments
from timl.model.build import build_config, build_model, check_config_saves
from timl.train.trainer import Trainer


def run(tmp_path, name: str, **overrides) -> list[float]:
    write_learnable_shards(tmp_path, 2048, "train")
    args = TrainingArguments(output_dir=str(tmp_path / name), train_file_pattern=str(tmp_path / "train_*.bin"),
                             block_size=16, train_batch_size=4, per_device_train_batch_size=4, max_train_steps=3,
                             log_every_steps=1, save_every_steps=0, report_to="none", optim="adamw_torch",
                             learning_rate=1e-2, **overrides)
    torch.manual_seed(0)
    Trainer(build_model(build_config("gpt2", TINY_GPT2)), args).train()
    return [r["train_loss"] for r in read_metrics(tmp_path / name) if "train_loss" in r]


def test_full_activation_memory_recomputes_each_block_to_the_same_losses(tmp_path):
    assert run(tmp_path, "checkpointed", activation_memory="full") == run(tmp_path, "plain")


def test_compiling_each_block_trains_to_the_same_losses(tmp_path):
    compiled = run(tmp_path, "blocks", torch_compile="blocks")
    assert compiled == pytest.approx(run(tmp_path, "eager"), rel=1e-5)


def test_fp8_without_fp8_hardware_is_refused_before_training(tmp_path):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has FP8")
    with pytest.raises(ValueError, match="--fp8 tensorwise needs a GPU with FP8 tensor cores"):
        run(tmp_path, "fp8", fp8="tensorwise")
    assert not (tmp_path / "fp8" / "metrics.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 tensor cores")
def test_fp8_trains_the_tied_head_in_fp8_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    write_learnable_shards(tmp_path, 2048, "train")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"),
                             block_size=16, train_batch_size=16, per_device_train_batch_size=16, max_train_steps=20,
                             log_every_steps=1, save_every_steps=0, report_to="none", optim="adamw_torch",
                             learning_rate=1e-2, fp8="tensorwise_head")
    torch.manual_seed(0)
    model = build_model(build_config("gpt2", TINY_GPT2))
    trainer = Trainer(model, args)
    trainer.train()
    # GPT-2's blocks are Conv1D, so the head is its one linear layer: FP8, and still the embedding's tensor.
    assert type(model.lm_head).__name__ == "Float8Linear"
    assert model.lm_head.weight is model.transformer.wte.weight
    assert trainer.training_loss.path == "logits"
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.8 * losses[0]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "main")
    assert torch.equal(loaded.lm_head.weight, model.transformer.wte.weight.detach().cpu())
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_bad_compile_memory_and_fp8_arguments_are_named():
    with pytest.raises(ValueError) as error:
        TrainingArguments(fp8="e5m2", torch_compile="fastest", activation_memory="1.5", pad_vocab_size_to="-3")
    for text in ("--fp8 'e5m2'", "--torch_compile 'fastest'", "--activation_memory '1.5' is not none, selective",
                 "--pad_vocab_size_to '-3'"):
        assert text in str(error.value)
    with pytest.raises(ValueError, match="--activation_memory 0.5 is the compiler's"):
        TrainingArguments(torch_compile="false", activation_memory="0.5")


def test_an_fp8_head_needs_the_models_own_logits():
    with pytest.raises(ValueError, match="the chunked loss path multiplies the head's weight itself"):
        TrainingArguments(output_dir="unused", fp8="tensorwise_head", loss_implementation="chunked")
    TrainingArguments(output_dir="unused", fp8="tensorwise_head", loss_implementation="logits")
    TrainingArguments(output_dir="unused", fp8="tensorwise", loss_implementation="chunked")


def saved_bytes_of_a_compiled_step(activation_memory: str = "none") -> tuple[int, float]:
    """Bytes the compiled training module keeps for its backward (through autograd's saved-tensor hooks), and the
    loss, compiled whole by the plan for `activation_memory`."""
    from timl.model.forward import CausalLMForTraining, TrainingLoss
    from timl.model.head import read_head
    from timl.train.plan import compile_training, make_plan

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(build_config("gpt2", TINY_GPT2))
    training = CausalLMForTraining(model, TrainingLoss("full", read_head(model)), {}, return_outputs=False)
    args = TrainingArguments(output_dir="unused", torch_compile="model", activation_memory=activation_memory)
    step = compile_training(training, model, make_plan(args.compute, torch.device("cpu"), model))
    tokens = torch.randint(0, 64, (4, 33))
    inputs = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step(inputs, torch.tensor(4.0 * 32))[0]
    loss.backward()
    return sum(saved.values()), loss.item()


def test_a_lower_activation_memory_budget_makes_the_compiled_step_keep_less_for_its_backward():
    import torch._functorch.config as functorch_config

    # The config's own patch restores what compile_training sets (pytest's monkeypatch would delete the attribute on
    # undo, which hides it from every later compile in this process).
    with functorch_config.patch(activation_memory_budget=functorch_config.activation_memory_budget):
        default_bytes, default_loss = saved_bytes_of_a_compiled_step()
        lean_bytes, lean_loss = saved_bytes_of_a_compiled_step("0.0")
        assert functorch_config.activation_memory_budget == 0.0
    assert lean_bytes < 0.75 * default_bytes
    assert lean_loss == pytest.approx(default_loss, rel=1e-6)


def test_selective_activation_memory_makes_the_compiled_step_keep_less_for_its_backward():
    import torch._functorch.config as functorch_config

    ban = functorch_config.ban_recompute_materialized_backward
    with functorch_config.patch(ban_recompute_materialized_backward=ban):
        default_bytes, default_loss = saved_bytes_of_a_compiled_step()
        assert functorch_config.ban_recompute_materialized_backward is True
        lean_bytes, lean_loss = saved_bytes_of_a_compiled_step("selective")
        assert functorch_config.ban_recompute_materialized_backward is False
    assert functorch_config.ban_recompute_materialized_backward is ban
    assert lean_bytes < 0.9 * default_bytes
    assert lean_loss == pytest.approx(default_loss, rel=1e-6)


def test_selective_activation_memory_needs_compilation():
    with pytest.raises(ValueError, match="--activation_memory selective is the compiler's"):
        TrainingArguments(output_dir="unused", torch_compile="false", activation_memory="selective")


# The README's own example, word for word.
README_GEMMA2 = ("hidden_size=512,intermediate_size=2048,num_hidden_layers=8,num_attention_heads=8,"
                 "num_key_value_heads=4,head_dim=64,vocab_size=50257")


@pytest.mark.parametrize("model_name,overrides,layers", [("qwen3", "num_hidden_layers=2", 2),
                                                         ("qwen2", "num_hidden_layers=2", 2),
                                                         ("gemma2", README_GEMMA2, 8)])
def test_overridden_layer_counts_give_configs_that_save(model_name, overrides, layers, tmp_path):
    """layer_types follows num_hidden_layers; it used to keep the default config's 32 (or 26) entries, which
    transformers refused when the first checkpoint saved the config."""
    build_config(model_name, overrides).save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    assert saved.num_hidden_layers == len(saved.layer_types) == layers


def test_overrides_are_constructor_arguments_so_derived_sizes_follow_them():
    config = build_config("llama", "hidden_size=64,num_attention_heads=4")
    assert config.head_dim == 16  # hidden_size / num_attention_heads, not the default config's 128
    assert build_config("llama", "hidden_size=64,num_attention_heads=4,head_dim=32").head_dim == 32
    assert build_config("llama-3.2-1b", "num_hidden_layers=2").rope_parameters["rope_theta"] == 500000.0


def test_a_saved_configs_layer_pattern_is_kept_until_its_layer_count_changes(tmp_path):
    pattern = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    AutoConfig.for_model("qwen3", num_hidden_layers=4, use_sliding_window=True, sliding_window=16,
                         max_window_layers=1, layer_types=pattern).save_pretrained(tmp_path)
    assert build_config(str(tmp_path), "hidden_size=256").layer_types == pattern  # set by hand: kept
    # Three layers: derived as transformers derives them (sliding from max_window_layers on).
    assert build_config(str(tmp_path), "num_hidden_layers=3").layer_types == [
        "full_attention", "sliding_attention", "sliding_attention"]


def test_a_config_transformers_refuses_is_refused_at_build_naming_the_flag(monkeypatch):
    with pytest.raises(ValueError, match=r"--config_overrides 'hidden_size=30,num_attention_heads=4': (?s:.*)"
                                         r"The hidden size \(30\) is not a multiple of the number of attention heads"):
        build_config("llama", "hidden_size=30,num_attention_heads=4")
    with pytest.raises(ValueError, match="--config_overrides 'nonsense=3': key nonsense isn't in the original"):
        build_config("llama", "nonsense=3")

    def unwritable(self, path, use_diff=True):
        raise TypeError("Object of type Tensor is not JSON serializable")

    monkeypatch.setattr(LlamaConfig, "to_json_file", unwritable)
    with pytest.raises(ValueError, match="--model_name 'llama': transformers would refuse to save this llama config, "
                                         "at the run's first checkpoint: Object of type Tensor is not JSON"):
        build_config("llama")


def test_check_config_saves_refuses_a_model_whose_config_would_fail_the_first_checkpoint():
    model = build_model(build_config("qwen3", "vocab_size=64,hidden_size=32,intermediate_size=64,num_hidden_layers=2,"
                                              "num_attention_heads=4,num_key_value_heads=2,head_dim=8"))
    check_config_saves(model)
    check_config_saves(torch.nn.Linear(2, 2))  # no config: nothing to save
    model.config.num_hidden_layers = 3
    with pytest.raises(ValueError, match=r"The qwen3 model's config would fail at the first checkpoint save: (?s:.*)"
                                         r"`num_hidden_layers` \(3\) must be equal to the number of `layer_types`"):
        check_config_saves(model)

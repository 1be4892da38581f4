"""Every accelerate config in accelerate_configs/ loads with Accelerate's own parser, and every key is commented."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "accelerate_configs").glob("*.yaml"))


def test_the_five_configs_exist():
    assert {path.stem for path in CONFIGS} == {"single_gpu", "multi_gpu", "multi_node", "cpu", "fsdp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_parses_with_accelerate(path):
    config = ClusterConfig.from_yaml_file(path)
    expected = {"cpu": "NO", "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU", "fsdp": "FSDP"}
    assert config.distributed_type.value == expected[path.stem]
    assert config.use_cpu == (path.stem == "cpu")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_key_carries_a_comment(path):
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"{path.name}: no comment on {line!r}"


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2"])
def test_the_fsdp_config_wraps_each_models_own_block(model_type, monkeypatch):
    """fsdp.yaml names no block class: Accelerate takes it from the model timl prepares, which forwards the inner
    model's _no_split_modules."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import AutoConfig, AutoModelForCausalLM

    from timl.model.forward import TrainingLoss
    from timl.model.forward import CausalLMForTraining

    settings = yaml.safe_load((CONFIGS[0].parent / "fsdp.yaml").read_text())["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in settings
    for key, value in settings.items():  # as `accelerate launch` hands the config to the processes
        monkeypatch.setenv(key.upper(), str(value))
    plugin = FullyShardedDataParallelPlugin()
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, n_embd=32, n_layer=2, n_head=2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes))
    wrapper = CausalLMForTraining(model, TrainingLoss("logits"), {}, return_outputs=False)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, wrapper)
    wrapped = {type(module).__name__ for module in wrapper.modules() if policy(module)}
    assert wrapped == set(model._no_split_modules) and wrapped


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_no_config_sets_a_precision_that_the_trainer_would_override(path):
    """The Trainer passes Accelerate its own mixed precision, from --bf16: a mixed_precision key would do nothing."""
    import yaml

    assert "mixed_precision" not in yaml.safe_load(path.read_text())

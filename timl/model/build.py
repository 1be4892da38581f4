"""Models: built from a config or loaded with weights, vocab padding, and what training needs of them before the
first step: a config that saves, tied weights that stay tied, activation checkpointing, compilation.

The output head is described and checked in timl.model.head; the training forward is timl.model.forward.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from timl.checkpoint.state import write_model_config
from timl.config.arguments import ATTENTION_CHOICES

logger = logging.getLogger(__name__)

# GPT-2's four sizes, as OpenAI released them; GPT2Config() alone is gpt2 (124M).
GPT2_SIZES = {
    "gpt2": {},
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-large": {"n_embd": 1280, "n_layer": 36, "n_head": 20},
    "gpt2-xl": {"n_embd": 1600, "n_layer": 48, "n_head": 25},
}
# Shapes of well-known releases, built locally (no download): the weights are fresh either way.
LOCAL_CONFIGS = {
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                   rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
}


def build_config(model_name: str, config_overrides: str | None = None, trust_remote_code: bool = False,
                 flag: str = "--model_name") -> PretrainedConfig:
    """A config by name: GPT-2 sizes and LOCAL_CONFIGS are built locally, as is any transformers model type
    ("llama", "gemma2", ...) with its default sizes; anything else is a local folder or a Hub id.

    `config_overrides` is transformers' run_clm syntax, e.g. "n_layer=2,n_embd=64"; the config is built again with
    them (`_with_overrides`). A config that transformers would refuse to save is refused here, not at the first
    checkpoint.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    key = model_name.removeprefix("openai-community/")
    arguments = None  # the constructor arguments of a config built here
    if key in GPT2_SIZES:
        model_type, arguments = "gpt2", GPT2_SIZES[key]
    elif key in LOCAL_CONFIGS:
        model_type, arguments = LOCAL_CONFIGS[key]
    elif key in CONFIG_MAPPING:
        model_type, arguments = key, {}
    if arguments is None:
        config = _hub_call(AutoConfig.from_pretrained, model_name, flag, trust_remote_code=trust_remote_code)
    else:
        config = AutoConfig.for_model(model_type, **arguments)
    if config_overrides:
        config = _with_overrides(config, config_overrides, arguments)
    error = _save_error(config.save_pretrained)
    if error:
        given = f"--config_overrides {config_overrides!r}" if config_overrides else f"{flag} {model_name!r}"
        raise ValueError(f"{given}: transformers would refuse to save this {config.model_type} config, at the "
                         f"run's first checkpoint: {error}")
    return config


def _with_overrides(config: PretrainedConfig, overrides: str, arguments: dict[str, Any] | None) -> PretrainedConfig:
    """The config built again through its class, with the overrides among its constructor arguments, so that its
    __init__ derives from them what it derives: layer_types from num_hidden_layers, head_dim from hidden_size, ....
    Set on the built config (update_from_string), those would keep the old sizes' values, and transformers refuses
    such a config only when the first checkpoint saves it.

    `arguments` are what the config was built from; a loaded config (None: a folder or a Hub id) is built again from
    its saved values (`_saved_arguments`).
    """
    updated = copy.deepcopy(config)
    try:
        # transformers types each value as the one it replaces, and refuses names the config lacks.
        updated.update_from_string(overrides)
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}") from None
    names = [item.split("=")[0] for item in overrides.split(",")]
    overridden = {updated.attribute_map.get(name, name): getattr(updated, name) for name in names}
    if arguments is None:
        arguments = _saved_arguments(config, getattr(updated, "num_hidden_layers", None))
    try:
        return type(config)(**{**arguments, **overridden})
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}") from None


def _saved_arguments(config: PretrainedConfig, layers: int | None) -> dict[str, Any]:
    """A loaded config's values, to build it again with `layers` layers: when that changes the layer count, less
    the lists of one entry per old layer that its __init__ derives when they are absent (default None:
    layer_types, mlp_layer_types, ...), so that it derives them for the new count as it would for a fresh config.

    A saved list may hold a pattern set by hand, so it is kept while the layer count stays: only then can it still
    be right. A field that __init__ does not derive is kept too; if it is now wrong, validation says so.
    """
    saved, saved_layers = config.to_dict(), getattr(config, "num_hidden_layers", None)
    if layers == saved_layers:
        return saved
    derived = {field.name for field in dataclasses.fields(config) if field.default is None}
    return {name: value for name, value in saved.items()
            if not (name in derived and isinstance(value, list) and len(value) == saved_layers)}


def check_config_saves(model: torch.nn.Module) -> None:
    """Writes the model's config (and generation config) into a temporary folder as every checkpoint writes them,
    so that a config transformers refuses to save stops the run at start-up, not at its first checkpoint."""
    error = _save_error(lambda directory: write_model_config(model, directory))
    if error:
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise ValueError(f"The {model_type} model's config would fail at the first checkpoint save: {error}")


def _save_error(write: Callable[[Path], Any]) -> Exception | None:
    """What writing into a fresh temporary folder raises, if anything."""
    with tempfile.TemporaryDirectory() as directory:
        try:
            write(Path(directory))
        except Exception as error:  # anything a save would raise, for the caller to report with what to change
            return error
    return None


def build_model(config: PretrainedConfig, attn_implementation: str | None = None,
                trust_remote_code: bool = False) -> torch.nn.Module:
    """A freshly initialised causal LM for the config: pre-training starts from scratch."""
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                trust_remote_code=trust_remote_code)
    except (ValueError, ImportError) as error:
        raise _attention_error(error, config.model_type, attn_implementation) from None


def load_pretrained(name_or_path: str, attn_implementation: str | None = None, trust_remote_code: bool = False,
                    config_overrides: str | None = None) -> torch.nn.Module:
    """A causal LM with its released or saved weights, for continued pre-training."""
    config = build_config(name_or_path, config_overrides, trust_remote_code, flag="--from_pretrained")
    try:
        return _hub_call(AutoModelForCausalLM.from_pretrained, name_or_path, "--from_pretrained", config=config,
                         attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    except (ValueError, ImportError) as error:
        raise _attention_error(error, config.model_type, attn_implementation) from None


def _hub_call(function: Any, name: str, flag: str, **kwargs: Any) -> Any:
    """Calls a from_pretrained; a name that is neither a folder nor reachable gets an error saying what to do."""
    try:
        return function(name, **kwargs)
    except OSError as error:
        raise ValueError(
            f"{flag} {name!r}: not a local folder, and not found on the Hub or in its cache ({error}). Offline, "
            f"download it beforehand (huggingface-cli download {name}) or pass a folder; a fresh model can also be "
            f"built from a transformers model type such as 'llama' with --config_overrides.") from None


def _attention_error(error: Exception, model_type: str, attn_implementation: str | None) -> ValueError:
    if attn_implementation is None or "attn" not in str(error).lower() and "attention" not in str(error).lower():
        return ValueError(str(error))
    return ValueError(f"--attn_implementation {attn_implementation} does not work with {model_type}: {error} "
                      f"Leave it unset to let transformers choose, or pick another of {', '.join(ATTENTION_CHOICES)}.")


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def real_vocab_size(model: torch.nn.Module) -> int | None:
    """The vocab without padding, from the config (an object or, for custom models, a dict), if it says."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return config.get("unpadded_vocab_size") or config.get("vocab_size")
    return getattr(config, "unpadded_vocab_size", None) or getattr(config, "vocab_size", None)


def pad_vocab(model: torch.nn.Module, multiple: int) -> None:
    """Pads the embeddings (and a tied or untied output head) to a multiple of `multiple` rows, for faster matmuls.

    The config then states the padded size, so checkpoints load with from_pretrained; `unpadded_vocab_size` keeps
    the real one, which the losses and metrics use.
    """
    real = real_vocab_size(model)
    if real is None or real % multiple == 0:
        return
    model.resize_token_embeddings(real, pad_to_multiple_of=multiple, mean_resizing=False)
    model.config.unpadded_vocab_size = real
    logger.info("Padded the vocab from %d to %d rows.", real, model.config.vocab_size)


def enable_activation_checkpointing(model: torch.nn.Module) -> str:
    """Recomputes each transformer block in the backward (non-reentrant, so it composes with DDP, FSDP and
    torch.compile)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--activation_checkpointing: {type(model).__name__} does not support gradient "
                         f"checkpointing (transformers' supports_gradient_checkpointing is off).")
    non_reentrant = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns it will go
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
    return "activation checkpointing per block"


def check_tied_weights(model: torch.nn.Module) -> None:
    """Refuses to train a model whose config ties the output head to the input embedding but whose two weights
    are now separate tensors (a wrapper that re-created parameters): the head would silently never train."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_input_embeddings"):
        return
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embedding is not None and head.weight is not embedding.weight:
        raise RuntimeError(f"{type(model).__name__} ties its output head to its input embedding, but after "
                           f"Accelerate's prepare they are two tensors: the head would never train. With FSDP, set "
                           f"fsdp_cpu_ram_efficient_loading: false (accelerate_configs/fsdp.yaml does).")

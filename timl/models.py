"""Model configs built locally, so that well-known architectures need no network."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, PretrainedConfig

# GPT-2's four sizes, as OpenAI released them; GPT2Config() alone is gpt2 (124M).
GPT2_SIZES = {
    "gpt2": {},
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-large": {"n_embd": 1280, "n_layer": 36, "n_head": 20},
    "gpt2-xl": {"n_embd": 1600, "n_layer": 48, "n_head": 25},
}


def build_config(model_name: str, config_overrides: str | None = None) -> PretrainedConfig:
    """A config by name: GPT-2 sizes are built locally; anything else is a Hub id or a local folder.

    `config_overrides` is transformers' run_clm syntax, e.g. "n_layer=2,n_embd=64".
    """
    key = model_name.removeprefix("openai-community/")
    config = GPT2Config(**GPT2_SIZES[key]) if key in GPT2_SIZES else AutoConfig.from_pretrained(model_name)
    if config_overrides:
        try:
            config.update_from_string(config_overrides)
        except (ValueError, TypeError) as error:
            raise ValueError(f"--config_overrides {config_overrides!r}: {error}") from None
    return config


def build_model(config: PretrainedConfig, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A freshly initialised causal LM for the config: pre-training starts from scratch."""
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

"""What every recipe shares: the model arguments, and building a fresh model before handing it to the Trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers.trainer_utils import set_seed

from timl.arguments import TrainingArguments
from timl.models import build_config, build_model, max_positions
from timl.trainer import Trainer


@dataclass
class ModelArguments:
    """Which model to pre-train."""

    model_name: str = field(default="gpt2", metadata={"help": "gpt2, gpt2-medium, gpt2-large or gpt2-xl (built "
                                                               "locally, no network), or a Hub id or local folder."})
    config_overrides: str | None = field(default=None, metadata={"help": "Changes to the config, as in "
                                                                        "transformers' run_clm: 'n_layer=2,n_embd=64'."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})


def pretrain(model_args: ModelArguments, args: TrainingArguments, **trainer_kwargs: Any) -> dict[str, float]:
    """Builds the model from scratch and trains it; returns the last logged values."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(model_args.model_name, model_args.config_overrides)
    positions = max_positions(config)
    if positions is not None and args.block_size > positions:
        raise ValueError(f"--block_size {args.block_size} exceeds the model's {positions} positions; lower it or "
                         f"raise them with --config_overrides.")
    # Seeded before the model is built, so every run of the same arguments starts from the same weights.
    set_seed(args.seed)
    model = build_model(config, model_args.attn_implementation)
    return Trainer(model, args, **trainer_kwargs).train()

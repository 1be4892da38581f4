"""What every recipe shares: the model arguments, and building (or loading) the model before handing it to the
Trainer; and `timl train`, the original timl's command line (recipes/gpt2_c4.py launches the same)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from transformers.trainer_utils import set_seed

from timl.config.arguments import ModelArguments, TrainingArguments
from timl.errors import RunError
from timl.model.build import build_config, build_model, load_pretrained, max_positions
from timl.model.forward import use_flex_for_documents
from timl.train.trainer import Trainer, check_files


def make_model(model_args: ModelArguments, args: TrainingArguments) -> torch.nn.Module:
    """The model the arguments describe: fresh weights from a config, or loaded ones. With --document_masking on a
    GPU and no --attn_implementation, the attention is FlexAttention where the model has it (the fastest exact
    kernel for packed documents; timl.model.forward.use_flex_for_documents)."""
    if model_args.from_pretrained:
        model = load_pretrained(model_args.from_pretrained, model_args.attn_implementation,
                                model_args.trust_remote_code, model_args.config_overrides)
        config = model.config
    else:
        config = build_config(model_args.model_name, model_args.config_overrides, model_args.trust_remote_code)
    positions = max_positions(config)
    if positions is not None and args.data.block_size > positions:
        raise ValueError(f"--block_size {args.data.block_size} exceeds the model's {positions} positions; lower it or "
                         f"raise them with --config_overrides.")
    if not model_args.from_pretrained:
        # Seeded before the model is built, so every run of the same arguments starts from the same weights.
        set_seed(args.loop.seed)
        model = build_model(config, model_args.attn_implementation, model_args.trust_remote_code)
    if args.data.document_masking and model_args.attn_implementation is None and torch.cuda.is_available():
        use_flex_for_documents(model)
    return model


def model_info(model_args: ModelArguments, model: torch.nn.Module) -> dict[str, Any]:
    """What run_config.json and every checkpoint record of how the model was made: the model arguments and, for
    pretrained weights from the Hub, the commit they were read at."""
    info = dataclasses.asdict(model_args)
    if model_args.from_pretrained:
        info["from_pretrained_commit"] = getattr(getattr(model, "config", None), "_commit_hash", None)
    return info


def pretrain(model_args: ModelArguments, args: TrainingArguments, **trainer_kwargs: Any) -> dict[str, float]:
    """Builds the model (or loads it) and trains it; returns the last logged values."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_files(args)  # the shards and output_dir, before the model is built (the Trainer checks them again)
    model = make_model(model_args, args)
    return Trainer(model, args, model_info=model_info(model_args, model), **trainer_kwargs).train()


@contextlib.contextmanager
def recipe_process() -> Iterator[None]:
    """What a recipe's process does around its run. A RunError (a bad checkpoint, a failed save, a non-finite loss,
    an output folder in use) ends the process with exit code 1 and its message alone, printed once, by the main
    process: the message says what happened and what to do, and a traceback would bury it. And what the run left in
    reference cycles is collected while the interpreter is whole: a DDP module and its gloo process group destroyed
    during the interpreter's exit can abort the process ("terminate called without an active exception") after a run
    that went well, and the launcher then reports a failure."""
    try:
        yield
    except RunError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"\ntiml: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    """`timl train [FLAGS | args.yaml | args.json]`: builds the model the flags describe and pre-trains it."""
    from timl.config.parsing import parse_args

    model_args, training_args = parse_args(ModelArguments, TrainingArguments, argv=argv)
    with recipe_process():
        pretrain(model_args, training_args)
    return 0

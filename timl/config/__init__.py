"""The arguments of a run: small dataclasses per concern, parsed flat from the command line, YAML or JSON.

Importing this package imports no torch, so that `timl train --help` and argument errors come at once."""

from timl.config.arguments import (CheckpointArguments, ComputeArguments, DataArguments, HubArguments, LoggingArguments,
                                   LoopArguments, LossArguments, ModelArguments, OptimizerArguments, TrainingArguments)
from timl.config.parsing import file_arguments, parse_args

__all__ = ["CheckpointArguments", "ComputeArguments", "DataArguments", "HubArguments", "LoggingArguments",
           "LoopArguments", "LossArguments", "ModelArguments", "OptimizerArguments", "TrainingArguments",
           "file_arguments", "parse_args"]

"""Per-token loss weights through a custom train loader: a float32 shard beside each token shard, read by ShardLoader
as batch["weights"], aligned with input_ids, and a loss that weighs each token's cross-entropy by it.

Here the weights down-weight the predictions made with little context: the first --context_tokens positions of each
document (counting the end-of-text token before it) get --short_context_weight, the rest 1.

    python examples/weighted_loader.py --output_dir runs/weighted --max_train_steps 20

Without --train_file_pattern it trains on GPT-2 shards of Python's documentation, made first if missing.
"""

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from timl.config import DataArguments, ModelArguments, TrainingArguments, parse_args
from timl.data.loader import ShardLoader
from timl.loss.cross_entropy import IGNORE_INDEX
from timl.train.pretrain import pretrain
from timl.data.shards import list_shards, write_shard

from small_run import SMALL_RUN_DEFAULTS, with_default_data  # examples/small_run.py


@dataclass
class ExampleArguments:
    """How the example weighs each token."""

    eot_token: int = field(default=50256, metadata={"help": "The end-of-text id (GPT-2's <|endoftext|>)."})
    context_tokens: int = field(default=8, metadata={"help": "Positions with fewer tokens of document context "
                                                             "than this are down-weighted."})
    short_context_weight: float = field(default=0.25, metadata={"help": "Their weight; 1 turns weighting off."})


def write_weights(args: TrainingArguments, example: ExampleArguments) -> str:
    """Writes output_dir/weights/<token shard name>, one float32 per token; returns their glob pattern."""
    folder = Path(args.output_dir) / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    context = 0  # tokens of document context at the end of the previous shard: a document may span two shards
    for shard in list_shards(args.train_file_pattern):
        tokens = shard.memmap()
        index = np.arange(len(tokens))
        last_eot = np.maximum.accumulate(np.where(tokens == example.eot_token, index, -1 - context))
        contexts = index - last_eot  # 0 at an end-of-text token: what follows it starts a new document
        write_shard(folder / shard.path.name, np.where(contexts < example.context_tokens, example.short_context_weight,
                                                       1.0).astype(np.float32))
        context = int(contexts[-1])
    return str(folder / Path(args.train_file_pattern).name)


def weighted_loader(data: DataArguments, accelerator: Accelerator, *, weights_pattern: str,
                    max_tokens: int | None) -> ShardLoader:
    """A train loader factory: it gets the data arguments and the accelerator; the rest is bound beforehand."""
    return ShardLoader(data.train_file_pattern, float_file_pattern=weights_pattern, float_key="weights",
                       rank=accelerator.process_index, world_size=accelerator.num_processes, device=accelerator.device,
                       block_size=data.block_size, per_device_batch_size=data.per_device_train_batch_size,
                       max_tokens=max_tokens)


def weighted_loss(outputs, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
    # weights[t] goes with input_ids[t], hence with the prediction of labels[t]; dividing by the global token count
    # (not the summed weights) keeps the shares exact under accumulation, so train_loss is a weighted sum per token.
    per_token = F.cross_entropy(outputs.logits.flatten(0, -2).float(), inputs["labels"].flatten(),
                                ignore_index=IGNORE_INDEX, reduction="none")
    return (per_token * inputs["weights"].flatten()).sum() / num_items_in_batch


if __name__ == "__main__":
    model_args, example, args = parse_args(ModelArguments, ExampleArguments, TrainingArguments,
                                           defaults={**SMALL_RUN_DEFAULTS, "output_dir": "runs/weighted_loader"})
    args = with_default_data(args)
    weights_pattern = write_weights(args, example)  # every process writes the same bytes, atomically, so they never clash
    latest = pretrain(model_args, args, compute_loss_func=weighted_loss,
                      train_loader_factory=functools.partial(weighted_loader, weights_pattern=weights_pattern,
                                                             max_tokens=args.max_train_tokens))
    print(f"eval loss {latest.get('eval_loss', float('nan')):.3f}. Weights in {weights_pattern}, metrics in "
          f"{args.output_dir}/metrics.jsonl, the model in {args.output_dir}/main/.")

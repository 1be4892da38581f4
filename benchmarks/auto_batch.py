"""What --per_device_train_batch_size auto picks for Llama-1B at 2048 tokens a sequence on one GPU, and whether that
micro-batch then trains: 3 steps of timl's defaults (the plan) on random tokens, the peak memory against the GPU's.

    python benchmarks/auto_batch.py [--train-batch-size 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from timl.config import TrainingArguments
from timl.data.shards import write_shard
from timl.model.build import build_config, build_model
from timl.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()
    config = build_config("llama-3.2-1b", None)
    with tempfile.TemporaryDirectory() as folder:
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, 2048 * options.train_batch_size
                                                   * (options.steps + 1) + 1)
        write_shard(Path(folder) / "train_000000.bin", tokens.astype(np.uint32))
        args = TrainingArguments(output_dir=f"{folder}/run", train_file_pattern=f"{folder}/train_*.bin",
                                 block_size=2048, train_batch_size=options.train_batch_size,
                                 per_device_train_batch_size="auto", max_train_steps=options.steps,
                                 log_every_steps=1, save_every_steps=0, report_to="none")
        torch.manual_seed(0)
        trainer = Trainer(build_model(config), args)
        trainer.save = lambda step, final, eval_pending=False: None  # a 15 GB checkpoint is no part of this
        chosen = trainer.args.per_device_train_batch_size
        trainer.train()
        total = torch.cuda.get_device_properties(0).total_memory
        print(f"AUTOBATCH chosen {chosen} of {options.train_batch_size}; peak "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; "
              f"{trainer.state.latest.get('tokens_per_second', float('nan')):,.0f} tokens/s (last logged step)")


if __name__ == "__main__":
    main()

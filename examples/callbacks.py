"""A custom callback with timl's Trainer: stop the run once the eval loss reaches a target. The run then saves a
checkpoint and main/ on its way out, and can be resumed with --resume_from_checkpoint latest like any other.

    python examples/callbacks.py --output_dir runs/callbacks --target_eval_loss 0.5

Without --train_file_pattern it first writes tiny shards of its own into output_dir/data: a 32-token phrase repeated,
entered at random places, which a small model learns in a few dozen steps on the CPU. Every flag of timl's
TrainingArguments works too, --early_stopping_patience among them.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from timl.config import ModelArguments, TrainingArguments, parse_args
from timl.train.callbacks import TrainerCallback
from timl.train.pretrain import pretrain
from timl.data.shards import write_shard

from small_run import SMALL_RUN_DEFAULTS  # examples/small_run.py


@dataclass
class ExampleArguments:
    """When the example stops."""

    target_eval_loss: float = field(default=0.5, metadata={"help": "Stop once the eval loss is at most this."})


DEFAULTS = {**SMALL_RUN_DEFAULTS, "output_dir": "runs/callbacks", "eval_every_steps": 10,
            "max_train_steps": 300,  # unless the target comes first
            "config_overrides": "n_layer=2,n_embd=64,n_head=2,n_positions=128,vocab_size=256,bos_token_id=0,"
                                "eos_token_id=0"}  # 256 token ids


class StopAtEvalLoss(TrainerCallback):
    """Asks the run to stop once the eval loss reaches `target`. Every process sees the same (all-reduced) eval loss,
    so all of them stop at the same step."""

    def __init__(self, target: float):
        self.target = target

    def on_evaluate(self, args, state, control, *, metrics, **kwargs):
        if metrics["eval_loss"] <= self.target:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_main_process:
            reached = f"reached at step {state.step}" if state.stopped_by else "not reached"
            print(f"eval loss target {self.target}: {reached} (best {state.best_eval_loss:.3f}).")


def with_tiny_shards(args: TrainingArguments) -> TrainingArguments:
    """Without --train_file_pattern: writes output_dir/data/{train,validation}_000000.bin and trains on them."""
    if args.train_file_pattern is not None:
        return args
    folder = Path(args.output_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    phrase = rng.permutation(256)[:32]
    for split, phrases in (("train", 2000), ("validation", 64)):
        tokens = np.concatenate([np.roll(phrase, -start) for start in rng.integers(0, 32, phrases)])
        write_shard(folder / f"{split}_000000.bin", tokens.astype(np.uint16))
    return replace(args, train_file_pattern=str(folder / "train_*.bin"),
                   eval_file_pattern=str(folder / "validation_*.bin"))


if __name__ == "__main__":
    model_args, example, args = parse_args(ModelArguments, ExampleArguments, TrainingArguments, defaults=DEFAULTS)
    pretrain(model_args, with_tiny_shards(args), callbacks=[StopAtEvalLoss(example.target_eval_loss)])

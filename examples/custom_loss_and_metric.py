"""A custom loss and a custom metric with timl's Trainer: label-smoothed next-token cross-entropy, and top-5 accuracy
reported at training (train_top5_accuracy) and at evaluation (eval_top5_accuracy).

    python examples/custom_loss_and_metric.py --output_dir runs/example --max_train_steps 20

Without --train_file_pattern it trains on GPT-2 shards of Python's documentation, made first if missing. Every flag
of timl's TrainingArguments and ModelArguments works; the defaults here make a small CPU run.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from timl.config import ModelArguments, TrainingArguments, parse_args
from timl.loss.cross_entropy import IGNORE_INDEX
from timl.report.metrics import TokenAverage
from timl.train.pretrain import pretrain

from small_run import SMALL_RUN_DEFAULTS, with_default_data  # examples/small_run.py


@dataclass
class ExampleArguments:
    """The example's loss."""

    label_smoothing: float = field(default=0.1, metadata={"help": "Mass spread evenly over the vocab, in [0, 1)."})


def label_smoothed_loss(smoothing: float):
    def loss(outputs, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
        # labels are already shifted (labels[t] follows input_ids[t]), so logits[t] meets labels[t] as they are.
        # Summed here and divided by the whole global batch's labelled tokens: the Trainer adds up the shares.
        summed = F.cross_entropy(outputs.logits.flatten(0, -2).float(), inputs["labels"].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing)
        return summed / num_items_in_batch

    return loss


class TopKAccuracy(TokenAverage):
    """The share of labelled tokens that are among the model's k most likely next tokens."""

    def __init__(self, k: int = 5):
        self.k = k
        super().__init__()  # TokenAverage keeps the sums on the device and reduces them over processes

    def per_token(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.topk(self.k, dim=-1).indices == labels[:, None]).any(dim=-1)

    def to_dict(self) -> dict[str, float]:
        return {f"top{self.k}_accuracy": self.mean()}


if __name__ == "__main__":
    model_args, example, args = parse_args(ModelArguments, ExampleArguments, TrainingArguments,
                                           defaults={**SMALL_RUN_DEFAULTS, "output_dir": "runs/custom_loss_and_metric"})
    args = with_default_data(args)
    # The train_loss logged is the smoothed loss; eval_loss is always the plain cross-entropy.
    latest = pretrain(model_args, args, compute_loss_func=label_smoothed_loss(example.label_smoothing),
                      train_metrics=[TopKAccuracy(5)], eval_metrics=[TopKAccuracy(5)])
    print(f"eval loss {latest.get('eval_loss', float('nan')):.3f}, eval top-5 accuracy "
          f"{latest.get('eval_top5_accuracy', float('nan')):.3f}. Metrics in {args.output_dir}/metrics.jsonl, the "
          f"model in {args.output_dir}/main/; plot them with `timl plot {args.output_dir}`.")

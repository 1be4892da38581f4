r"""AdamW against Muon + AdamW on GPT-2 124M: the same tokens, the same model, eval loss against tokens and seconds.

    python benchmarks/optimizer_comparison.py --train "data/python_docs/train_*.bin" \
        --eval "data/python_docs/validation_*.bin" --out comparison.md

Both runs use timl's real Trainer in this one process, one after the other, compiled, bf16 and vocab padded to 64,
with timl's own defaults for each optimizer (issue 16):
- AdamW: lr 6e-4 (GPT-2 small's), weight decay --weight_decay (0.1), fused on CUDA.
- Muon + AdamW: Muon at 0.02 with its own decay --muon_weight_decay (0 by default, as modded-nanogpt's GPT-2 runs),
  GPT-2's Conv1D weights at the lr of their [out, in] shape; AdamW at 6e-4 and --weight_decay (fused on CUDA) for the
  embeddings, head, norms and biases (modded-nanogpt's split).
The Markdown it writes states the settings, and whether each run's AdamW ran fused.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import set_seed

from timl.config.arguments import TrainingArguments
from timl.model.build import build_config, build_model
from timl.train.trainer import Trainer

OPTIMS = {"adamw_torch_fused": "AdamW", "muon": "Muon + AdamW"}


def run(optim: str, options: argparse.Namespace, output_dir: str) -> tuple[list[dict], bool]:
    """The run's metrics.jsonl records, and whether its AdamW was the fused implementation."""
    set_seed(0)
    model = build_model(build_config("gpt2"))
    args = TrainingArguments(
        output_dir=output_dir, train_file_pattern=options.train, eval_file_pattern=options.eval, block_size=1024,
        train_batch_size=options.batch, per_device_train_batch_size=options.batch, per_device_eval_batch_size=8,
        max_train_steps=options.steps, eval_every_steps=options.eval_every, log_every_steps=options.eval_every,
        save_every_steps=0, report_to="none", optim=optim, learning_rate=6e-4, weight_decay=options.weight_decay,
        muon_weight_decay=options.muon_weight_decay, warmup_steps=10, lr_scheduler_type="cosine", torch_compile="model",
        pad_vocab_size_to="64", seed=0)
    trainer = Trainer(model, args)
    trainer.train()
    adamw = trainer.optim.optimizers[trainer.optim.names.index("adamw")]
    fused = bool(getattr(adamw, "optimizer", adamw).defaults.get("fused"))  # under Accelerate's wrapper
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], fused


def curve(records: list[dict], tokens_per_step: int) -> list[tuple[int, float, float]]:
    return [(r["step"] * tokens_per_step, r["elapsed_seconds"], r["eval_loss"]) for r in records if "eval_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="glob of train shards")
    parser.add_argument("--eval", required=True, help="glob of eval shards")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="sequences of 1024 tokens a step")
    parser.add_argument("--eval_every", type=int, default=10, help="evaluate every this many steps")
    parser.add_argument("--weight_decay", type=float, default=TrainingArguments.weight_decay,
                        help="AdamW's weight decay, in both runs (default: timl's, %(default)s)")
    parser.add_argument("--muon_weight_decay", type=float, default=TrainingArguments.muon_weight_decay,
                        help="Muon's weight decay (default: timl's, %(default)s)")
    parser.add_argument("--out", default="optimizer_comparison.md", help="Markdown file to write")
    options = parser.parse_args()
    curves, fused = {}, {}
    for optim in OPTIMS:
        with tempfile.TemporaryDirectory() as output_dir:
            records, fused[optim] = run(optim, options, output_dir)
            curves[optim] = curve(records, options.batch * 1024)
        torch.cuda.empty_cache()
    adamw, muon = (OPTIMS[o] for o in OPTIMS)
    rows = [f"| tokens | {adamw} eval loss | {adamw} s | {muon} eval loss | {muon} s |", "|---:|---:|---:|---:|---:|"]
    for (tokens, adamw_s, adamw_loss), (_, muon_s, muon_loss) in zip(curves["adamw_torch_fused"], curves["muon"]):
        rows.append(f"| {tokens:,} | {adamw_loss:.4f} | {adamw_s:.1f} | {muon_loss:.4f} | {muon_s:.1f} |")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    settings = (f"device: {device}, torch {torch.__version__}; AdamW lr 6e-4, weight decay {options.weight_decay}; "
                f"Muon lr 0.02, weight decay {options.muon_weight_decay}; AdamW fused: "
                + ", ".join(f"{OPTIMS[o]} {'yes' if fused[o] else 'no'}" for o in OPTIMS))
    text = settings + "\n\n" + "\n".join(rows) + "\n"
    Path(options.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

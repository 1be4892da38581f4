"""bf16 against FP8 training (torchao float8, tensorwise and rowwise scaling) on real text: how far the loss curves
part, and the speed each gives.

    python benchmarks/fp8_loss.py [--recipes bf16,tensorwise,rowwise] [--steps 300] [--batch 8]
                                  [--data-dir data/python_docs] [--out FILE]

Every recipe trains the same model from the same seed on the same tokens through timl's Trainer, each in a process
of its own: the embedded corpus (Python's own documentation in GPT-2 BPE, timl.data.tokenize.prepare_python_docs, about
0.7M train tokens, so 300 steps of 8 × 1024 pass over it about 3.5 times), a Llama-shaped model of hidden size 1024,
8 layers, 16 heads of 64 with 4 key/value heads, FFN 4096, GPT-2's vocab 50257 padded to 64 and tied embeddings
(about 170M parameters); 1024-token sequences, AdamW at lr 6e-4 with 30 warm-up steps and cosine decay, bf16
autocast, timl's performance plan (each block compiled). FP8 converts the decoder's linear layers; the head stays
in bf16 except in "tensorwise+head".

The train loss is logged every 10 steps (the mean over those 10), the eval loss over the whole eval split every 100.
The table gives both at every 100th step with their gap to bf16, (fp8 − bf16) / bf16, and tokens/s over the steps
after the first 10. It goes to stdout and to --out (default $OUT/fp8_loss.md, else benchmarks/fp8_loss_latest.md);
each recipe's output to logs/fp8_loss-<recipe>.log beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from throughput import (argument_parser, default_out, devices_line, exit_on_sigterm, log_tail, new_model,
                        read_metrics, require_cuda, run_isolated, timl_arguments, timl_trainer, versions_line,
                        write_result)
from timl.model.build import build_config
from timl.data.tokenize import PYTHON_DOCS_DIR, prepare_python_docs

MODEL_OVERRIDES = ("hidden_size=1024,intermediate_size=4096,num_hidden_layers=8,num_attention_heads=16,"
                   "num_key_value_heads=4,head_dim=64,vocab_size=50257,max_position_embeddings=1024,"
                   "tie_word_embeddings=True")
BLOCK_SIZE, LOG_EVERY, EVAL_EVERY, WARMUP_STEPS = 1024, 10, 100, 30
RECIPES = ("bf16", "tensorwise", "rowwise", "tensorwise+head")
"""torchao's float8 recipes; "+head": the output head in FP8 too (--fp8 tensorwise_head)."""


def fp8_flag(recipe: str) -> str:
    """--fp8 for a recipe name of this script: "tensorwise+head" is --fp8 tensorwise_head."""
    return recipe.replace("+head", "_head")


def measure(options: argparse.Namespace) -> dict[str, Any]:
    """This process's part: one recipe's run, read back from its metrics.jsonl."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = timl_arguments(output_dir, options.train, BLOCK_SIZE, options.batch, options.steps, LOG_EVERY,
                              eval_file_pattern=options.eval, eval_every_steps=EVAL_EVERY, per_device_eval_batch_size=8,
                              fp8=None if options.child == "bf16" else fp8_flag(options.child),
                              # timl's defaults: its plan (each block compiled, the vocab padded to 64)
                              warmup_steps=WARMUP_STEPS, lr_scheduler_type="cosine")
        timl_trainer(new_model(build_config("llama", MODEL_OVERRIDES)), args).train()
        path = Path(output_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        timing = read_metrics(path, warmup=LOG_EVERY)
    return {"train_loss": {record["step"]: record["train_loss"] for record in records if "train_loss" in record},
            "eval_loss": {record["step"]: record["eval_loss"] for record in records if "eval_loss" in record},
            "tokens_per_second": options.batch * BLOCK_SIZE / timing.step_seconds,
            "first_step_seconds": timing.first_step_seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "device": torch.cuda.get_device_name()}


def gap(value: float | None, reference: float | None) -> str:
    return "—" if value is None or not reference else f"{(value - reference) / reference:+.2%}"


def loss(row: dict[str, Any], kind: str, step: int) -> float | None:
    return row.get(kind, {}).get(str(step))  # JSON keys are strings


def table(rows: dict[str, dict[str, Any]], steps: list[int]) -> list[str]:
    losses = [f"{kind} @{step}" for kind in ("train", "eval") for step in steps]
    lines = ["| recipe | tokens/s | vs bf16 | peak GiB | first step s | " + " | ".join(losses) + " |",
             "|---" + "|---:" * (4 + len(losses)) + "|"]
    reference = rows.get("bf16", {})
    for recipe, row in rows.items():
        if "error" in row:
            lines.append(f"| {recipe} | failed: {row['error']} |" + " |" * (3 + len(losses)))
            continue
        speed = (f"{row['tokens_per_second'] / reference['tokens_per_second']:.2f}×"
                 if reference.get("tokens_per_second") else "—")
        cells = []
        for kind in ("train_loss", "eval_loss"):
            for step in steps:
                value, base = loss(row, kind, step), loss(reference, kind, step)
                shown = "—" if value is None else f"{value:.4f}"
                cells.append(shown if recipe == "bf16" or value is None else f"{shown} ({gap(value, base)})")
        lines.append(f"| {recipe} | {row['tokens_per_second']:,.0f} | {speed} | {row['peak_gib']:.1f} | "
                     f"{row['first_step_seconds']:.1f} | " + " | ".join(cells) + " |")
    return lines


def write_report(options: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> list[str]:
    steps = list(range(EVAL_EVERY, options.steps + 1, EVAL_EVERY))
    lines = [
        "# bf16 against FP8 training on the embedded corpus, one GPU",
        "",
        devices_line(list(rows.values())),
        versions_line(),
        (f"- Llama shape ({MODEL_OVERRIDES}), vocab padded to 64; {options.steps} steps of {options.batch} × "
         f"{BLOCK_SIZE} tokens, seed 0, lr 6e-4, {WARMUP_STEPS} warm-up steps, cosine; compiled, bf16 autocast"),
        (f"- train @N: the mean train loss of steps N−{LOG_EVERY - 1}..N; eval @N: over the whole eval split; in "
         f"brackets: the gap to bf16, (fp8 − bf16) / bf16; tokens/s: the steps after the first {LOG_EVERY}"),
        "",
        *table(rows, steps),
    ]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="bf16 and torchao float8 recipes, in order "
                                                                     "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="sequences of 1024 tokens a step (default: %(default)s)")
    parser.add_argument("--data-dir", default=PYTHON_DOCS_DIR,
                        help="where the corpus's shards are made, or found (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per recipe (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=default_out("fp8_loss.md"), help="Markdown file (default: "
                                                                                        "%(default)s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # train one recipe here: what run_isolated launches
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--eval", help=argparse.SUPPRESS)
    options = parser.parse_args()
    recipes = options.recipes.split(",")
    if set(recipes) - set(RECIPES) or options.steps <= LOG_EVERY or options.batch < 1:
        parser.error(f"--recipes are some of {', '.join(RECIPES)}; --steps more than {LOG_EVERY}; --batch positive")
    require_cuda("benchmarks/fp8_loss.py")
    if options.child:
        write_result(options.result, lambda: measure(options))
        return
    exit_on_sigterm()
    train, evaluation = prepare_python_docs(options.data_dir)
    rows: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        print(f"{recipe} ...", flush=True)
        log = options.out.parent / "logs" / f"fp8_loss-{recipe}.log"
        rows[recipe] = run_isolated([str(Path(__file__).resolve()), "--child", recipe, "--steps", str(options.steps),
                                     "--batch", str(options.batch), "--train", train, "--eval", evaluation], log,
                                    timeout=options.timeout)
        if "error" in rows[recipe]:
            print(log_tail(log, 25), flush=True)
        print(write_report(options, rows)[-1], flush=True)
    print("\n".join(write_report(options, rows)) + f"\n\nwritten to {options.out}", flush=True)


if __name__ == "__main__":
    main()

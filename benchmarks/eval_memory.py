"""Peak GPU memory of timl's evaluation against its training step, at several per-device eval batch sizes: the
default loss path against loss_implementation="logits" (the model's own full logits).

    python benchmarks/eval_memory.py [--model llama-1b] [--eval-batches 8,32,64] [--train-batch 16]
                                     [--loss-paths auto,logits] [--eval-steps 2] [--out FILE]

For each loss path, one process builds timl's Trainer on random-token shards (the model, seed and optimizer of
benchmarks/throughput.py; compiled, bf16; 1024-token sequences), trains 3 steps of --train-batch sequences, then
calls Trainer.evaluate once per eval batch size, smallest first, --eval-steps batches each. The training peak is
torch.cuda.max_memory_allocated over the 3 steps; each evaluation's peak is taken from a reset just before it, with
the model and optimizer state resident, as between steps of a run. An evaluation that runs out of memory is recorded
and the larger sizes are skipped. The table goes to stdout and to --out (default $OUT/eval_memory.md, else
benchmarks/eval_memory_latest.md); each process's output to logs/eval_memory-<path>.log beside it.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from throughput import (MODELS, argument_parser, default_out, devices_line, error_text, exit_on_sigterm,
                        is_out_of_memory, log_tail, model_config, new_model, random_tokens, require_cuda, run_isolated,
                        timl_arguments, timl_trainer, versions_line, write_result)
from timl.data.shards import write_shard

BLOCK_SIZE = 1024
TRAIN_STEPS = 3


def measure(options: argparse.Namespace) -> dict[str, Any]:
    """This process's part: train, then evaluate at each size (see the module docstring)."""
    config = model_config(options.model)
    sizes = options.eval_batch_sizes
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        train_tokens = (TRAIN_STEPS + 1) * options.train_batch * BLOCK_SIZE + 1
        write_shard(root / "train_000000.bin", random_tokens(train_tokens, config.vocab_size))
        eval_tokens = max(sizes) * options.eval_steps * BLOCK_SIZE + 1
        write_shard(root / "validation_000000.bin", random_tokens(eval_tokens, config.vocab_size))
        args = timl_arguments(str(root / "run"), str(root / "train_*.bin"), BLOCK_SIZE, options.train_batch,
                              TRAIN_STEPS, 1, eval_file_pattern=str(root / "validation_*.bin"),
                              per_device_eval_batch_size=sizes[0], max_eval_steps=options.eval_steps,
                              loss_implementation=options.child, pad_vocab_size_to=64)
        trainer = timl_trainer(new_model(config), args)
        trainer.evaluate = lambda: {}  # the end-of-training evaluation: measured below instead, one size at a time
        trainer.train()
        del trainer.evaluate
        torch.cuda.synchronize()
        device = torch.device("cuda")
        row = {"loss_path": trainer.training_loss.path, "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "device": torch.cuda.get_device_name(device), "evals": []}
        for size in sizes:
            row["evals"].append(measure_evaluation(trainer, size, options.eval_steps))
            if "error" in row["evals"][-1]:
                break  # larger batches would run out of memory too
    return row


def measure_evaluation(trainer: Any, batch: int, steps: int) -> dict[str, Any]:
    trainer.args.data.per_device_eval_batch_size = batch  # the eval loader reads it afresh at every evaluation
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30
    start = time.perf_counter()
    try:
        values = trainer.evaluate()
    except Exception as error:  # noqa: BLE001 -- running out of memory is a result here
        if not is_out_of_memory(error):
            raise
        return {"batch": batch, "resident_gib": resident, "error": error_text(error), "oom": True}
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"batch": batch, "resident_gib": resident, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "tokens_per_second": batch * BLOCK_SIZE * steps / seconds, "eval_loss": values.get("eval_loss")}


def table(rows: dict[str, dict[str, Any]], train_batch: int) -> list[str]:
    lines = [f"| loss path | train peak GiB ({train_batch} × {BLOCK_SIZE}) | eval batch (× {BLOCK_SIZE}) "
             "| resident GiB | eval peak GiB | eval peak − resident | eval peak / train peak | eval tokens/s "
             "| eval loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for requested, row in rows.items():
        if "error" in row:
            lines.append(f"| {requested} | failed: {row['error']} | | | | | | | |")
            continue
        path = requested if row["loss_path"] == requested else f"{requested} ({row['loss_path']})"
        train = row["train_peak_gib"]
        for evaluation in row["evals"]:
            start = f"| {path} | {train:.1f} | {evaluation['batch']} | {evaluation['resident_gib']:.1f} |"
            if "error" in evaluation:
                lines.append(f"{start} out of memory | | | | |")
                continue
            peak = evaluation["peak_gib"]
            lines.append(f"{start} {peak:.1f} | {peak - evaluation['resident_gib']:.1f} | {peak / train:.2f} | "
                         f"{evaluation['tokens_per_second']:,.0f} | {evaluation['eval_loss']:.3f} |")
    return lines


def write_report(options: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"# timl evaluation memory: {MODELS[options.model].title}, {BLOCK_SIZE}-token sequences, one GPU",
        "",
        devices_line(list(rows.values())),
        versions_line(),
        (f"- {TRAIN_STEPS} train steps of {options.train_batch} sequences (compiled, bf16, fused AdamW), then "
         f"Trainer.evaluate over {options.eval_steps} batches at each eval batch size; random tokens"),
        ("- peaks: torch.cuda.max_memory_allocated; resident: allocated just before the evaluation (weights and "
         "optimizer state); a path in brackets is what the requested one resolved to"),
        "",
        *table(rows, options.train_batch),
    ]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", choices=list(MODELS), default="llama-1b", help="model shape (default: %(default)s)")
    parser.add_argument("--eval-batches", default="8,32,64", help="per-device eval batch sizes (default: %(default)s)")
    parser.add_argument("--train-batch", type=int, default=16, help="train sequences a step (default: %(default)s)")
    parser.add_argument("--loss-paths", default="auto,logits",
                        help="loss_implementation values, one process each (default: %(default)s)")
    parser.add_argument("--eval-steps", type=int, default=2, help="eval batches per evaluation (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=360, help="seconds per loss path (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=default_out("eval_memory.md"),
                        help="Markdown file (default: %(default)s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # measure one loss path here: what run_isolated launches
    parser.add_argument("--result", help=argparse.SUPPRESS)
    options = parser.parse_args()
    try:
        options.eval_batch_sizes = sorted(int(size) for size in options.eval_batches.split(","))
    except ValueError:
        parser.error(f"--eval-batches must be a comma list of integers, got {options.eval_batches!r}")
    if min(options.eval_batch_sizes + [options.train_batch, options.eval_steps]) < 1:
        parser.error("--eval-batches, --train-batch and --eval-steps must be positive")
    require_cuda("benchmarks/eval_memory.py")
    if options.child:
        write_result(options.result, lambda: measure(options))
        return
    exit_on_sigterm()
    rows: dict[str, dict[str, Any]] = {}
    for path in options.loss_paths.split(","):
        print(f"loss path {path} ...", flush=True)
        log = options.out.parent / "logs" / f"eval_memory-{path}.log"
        rows[path] = run_isolated([str(Path(__file__).resolve()), "--child", path, "--model", options.model,
                                   "--eval-batches", options.eval_batches, "--train-batch", str(options.train_batch),
                                   "--eval-steps", str(options.eval_steps)], log, timeout=options.timeout)
        if "error" in rows[path]:
            print(log_tail(log, 25), flush=True)
        write_report(options, rows)
        print("\n".join(table({path: rows[path]}, options.train_batch)[2:]), flush=True)
    print("\n".join(write_report(options, rows)) + f"\n\nwritten to {options.out}", flush=True)


if __name__ == "__main__":
    main()

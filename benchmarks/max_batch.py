"""The largest per-device batch that trains for 3 steps without running out of GPU memory: timl against the Hugging
Face Trainer (compiled), each with and without activation checkpointing.

    python benchmarks/max_batch.py [--model llama-1b] [--methods timl,timl-ac,timl-ac-chunked,hf-compiled,hf-compiled-ac]
                                   [--start 8] [--max-batch 512] [--trial-timeout 300] [--budget-seconds 480]

A method is a variant of benchmarks/throughput.py: the same model, seed, optimizer and random tokens. A trial runs
it at one batch size for 3 steps (1 warm-up, 2 timed; the optimizer's state exists from the second step on) in a
fresh process, so that running out of memory cannot poison the next trial. Batch sizes double from --start until a
trial runs out of memory, then the bracket is bisected. The methods take turns, one trial each, so that when
--budget-seconds is spent every method has a result: what is known then is reported as "≥ N". The table goes to
stdout and to --out (default $OUT/max_batch.md, else benchmarks/max_batch_latest.md); each trial's output to
logs/max_batch-<method>-<batch>.log beside it.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from throughput import (MODELS, VARIANTS, argument_parser, default_out, devices_line, exit_on_sigterm, log_tail,
                        require_cuda, run_isolated, variant_command, versions_line)

DEFAULT_METHODS = ("timl", "timl-ac", "timl-ac-chunked", "hf-compiled", "hf-compiled-ac")
WARMUP, STEPS = 1, 2  # three steps in all


class BatchSearch:
    """One method's search: doubling from `start` up to `limit`, then bisecting between the largest batch that fit
    and the smallest that did not."""

    def __init__(self, method: str, start: int, limit: int):
        self.method, self.start, self.limit = method, start, limit
        self.fits: int = 0  # the largest batch known to fit (0: none yet)
        self.fails: int | None = None  # the smallest batch known to run out of memory
        self.stopped: str | None = None  # why the search ended early: a crash, a timeout, the budget
        self.trials: list[tuple[int, dict[str, Any]]] = []

    def next_batch(self) -> int | None:
        if self.stopped:
            return None
        if self.fails is None:
            batch = self.start if not self.fits else min(2 * self.fits, self.limit)
            return None if batch <= self.fits else batch
        return (self.fits + self.fails) // 2 if self.fails - self.fits > 1 else None

    def record(self, batch: int, result: dict[str, Any]) -> None:
        self.trials.append((batch, result))
        if "error" not in result:
            self.fits = max(self.fits, batch)
        elif result.get("oom"):
            self.fails = batch if self.fails is None else min(self.fails, batch)
        else:
            self.stopped = f"{'timed out' if result.get('timeout') else 'failed'} at {batch}: {result['error']}"

    def answer(self) -> str:
        if self.fails is not None and self.fails - self.fits <= 1:
            return str(self.fits) if self.fits else "none: 1 runs out of memory"
        bounds = ([f"≥ {self.fits}"] if self.fits else []) + ([f"< {self.fails}"] if self.fails is not None else [])
        return ", ".join(bounds or ["unknown"]) + (" (the --max-batch cap)" if self.fits == self.limit else "")

    def fitted(self) -> dict[str, Any] | None:
        return next((result for batch, result in self.trials if batch == self.fits and "error" not in result), None)

    def estimate(self) -> int | None:
        """The batch at which peak memory, extrapolated on a line through the two largest batches that fit, would
        reach the device's memory: a guide where the search stopped early, not a measurement."""
        fitting = sorted((batch, result) for batch, result in self.trials if "error" not in result)
        if len(fitting) < 2:
            return None
        (small, low), (large, high) = fitting[-2], fitting[-1]
        slope = (high["peak_gib"] - low["peak_gib"]) / (large - small)
        if slope <= 0:
            return None
        return math.floor(large + (high["device_memory_gib"] - high["peak_gib"]) / slope)

    def trial_list(self) -> str:
        return " ".join(f"{batch}{'✓' if 'error' not in result else '✗' if result.get('oom') else '!'}"
                        for batch, result in self.trials)


def table(searches: list[BatchSearch], block_size: int) -> list[str]:
    lines = [f"| method | max batch (× {block_size} tokens) | peak GiB at it | tokens/s at it | memory-line estimate "
             "| trials (✓ fits, ✗ out of memory, ! other) | notes |",
             "|---|---:|---:|---:|---:|---|---|"]
    for search in searches:
        fitted = search.fitted() or {}
        peak, rate, estimate = fitted.get("peak_gib"), fitted.get("tokens_per_second"), search.estimate()
        lines.append(f"| {VARIANTS[search.method][0]} | {search.answer()} | "
                     f"{'—' if peak is None else f'{peak:.1f}'} | {'—' if rate is None else f'{rate:,.0f}'} | "
                     f"{'—' if estimate is None else f'≈ {estimate}'} | {search.trial_list()} | "
                     f"{search.stopped or ''} |")
    return lines


def write_report(options: argparse.Namespace, searches: list[BatchSearch], elapsed: float) -> list[str]:
    """Rewrites --out with what is known so far, after every trial; returns its lines."""
    spec = MODELS[options.model]
    results = [result for search in searches for _, result in search.trials]
    lines = [
        f"# Largest batch that trains: {spec.title}, {spec.block_size}-token sequences, one GPU",
        "",
        devices_line(results),
        versions_line(),
        (f"- each trial: {WARMUP + STEPS} steps of the benchmarks/throughput.py variant, in a fresh process; doubling "
         f"from {options.start}, then bisecting; capped at {options.max_batch}; {elapsed:.0f} s of a "
         f"{options.budget_seconds:.0f} s budget used; trial timeout {options.trial_timeout:.0f} s"),
        ("- peak GiB: torch.cuda.max_memory_allocated; tokens/s: the 2 timed steps of that trial (rough); "
         "memory-line estimate: where the peak of the two largest fitting batches, extrapolated, meets the "
         "device's memory (allocator overhead not counted)"),
        "",
        *table(searches, spec.block_size),
    ]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", choices=list(MODELS), default="llama-1b", help="model shape (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma list of benchmarks/throughput.py variants (default: %(default)s)")
    parser.add_argument("--start", type=int, help="first batch tried (default: the model's throughput batch)")
    parser.add_argument("--max-batch", type=int, default=512, help="largest batch tried (default: %(default)s)")
    parser.add_argument("--trial-timeout", type=float, default=300, help="seconds a trial may take (default: "
                                                                          "%(default)s); a timeout ends the method")
    parser.add_argument("--budget-seconds", type=float, default=480,
                        help="stop searching once this much time is spent, all methods together (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=default_out("max_batch.md"), help="Markdown file (default: "
                                                                                          "%(default)s)")
    options = parser.parse_args()
    options.start = options.start or MODELS[options.model].batch
    methods = options.methods.split(",")
    unknown = [method for method in methods if method not in VARIANTS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from the variants of throughput.py: {', '.join(VARIANTS)}")
    if min(options.start, options.max_batch) < 1 or options.start > options.max_batch:
        parser.error("--start and --max-batch must be positive, --start at most --max-batch")
    require_cuda("benchmarks/max_batch.py")
    exit_on_sigterm()

    searches = [BatchSearch(method, options.start, options.max_batch) for method in methods]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="timl-max-batch-") as caches:
        while any(search.next_batch() for search in searches):
            for search in searches:  # one trial each in turn
                batch, left = search.next_batch(), options.budget_seconds - (time.perf_counter() - began)
                if batch is None:
                    continue
                if left <= 0:
                    search.stopped = f"budget spent before trying {batch}"
                    continue
                log = options.out.parent / "logs" / f"max_batch-{search.method}-{batch}.log"
                print(f"{search.method}: batch {batch} ...", flush=True)
                start = time.perf_counter()
                # One compile cache per method: later trials may reuse what does not depend on the batch.
                result = run_isolated(variant_command(search.method, options.model, batch, WARMUP, STEPS, 1), log,
                                      timeout=min(options.trial_timeout, left),
                                      cache_dir=Path(caches) / search.method)
                if result.get("timeout") and left < options.trial_timeout:
                    search.stopped = outcome = f"budget spent while trying {batch}"
                else:
                    search.record(batch, result)
                    outcome = ("fits" if "error" not in result else "out of memory" if result.get("oom")
                               else result["error"])
                print(f"{search.method}: batch {batch}: {outcome} ({time.perf_counter() - start:.0f} s)", flush=True)
                if "error" in result and not result.get("oom"):
                    print(log_tail(log, 25), flush=True)
                write_report(options, searches, time.perf_counter() - began)
    lines = write_report(options, searches, time.perf_counter() - began)
    print("\n".join(lines) + f"\n\nwritten to {options.out}", flush=True)


if __name__ == "__main__":
    main()

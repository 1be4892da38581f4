"""Tokens per second of `timl tokenize` against raw tiktoken, side by side, on the same text in the same run.

    uv run python benchmarks/tokenize_throughput.py [--repeat 4] [--num_proc 1 2] [--trials 5]

The text is the corpus bundled with Python (timl:python-docs), repeated --repeat times and written once to a parquet
file. The rows:

- raw tiktoken: GPT-2's `encode_ordinary_batch` over the documents in memory, with 1 thread and its default 8, and
  split over N forked processes that each encode their share with 1 thread and return only a count (the best that
  N processes can do on this machine, with nothing to move between processes).
- timl: the whole `tokenize_dataset` run on the parquet file through datasets, shards written. Its rate counts the
  tokenizing loop (reading batches, tokenizing, writing files); "whole run" adds loading the tokenizer and opening
  the dataset, which cost the same at any dataset size.

Trials are interleaved (each round measures every row once) and each row keeps its best round, so that load from
other processes on a small shared machine hits every row alike. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from timl.data.corpus import python_docs_documents
from timl.data.encoders import load_tiktoken_encoding
from timl.data.tokenize import TokenizeArguments, tokenize_dataset

_encoding = None


def _count_tokens(documents: list[str]) -> int:
    return sum(map(len, _encoding.encode_ordinary_batch(documents, num_threads=1)))


def raw_tiktoken(documents: list[str], threads: int = 1, processes: int = 1) -> Callable[[], tuple[float, int]]:
    def measure() -> tuple[float, int]:
        start = time.perf_counter()
        if processes == 1:
            tokens = sum(map(len, _encoding.encode_ordinary_batch(documents, num_threads=threads)))
        else:
            shares = [documents[index::processes] for index in range(processes)]
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                tokens = sum(pool.map(_count_tokens, shares))
        return time.perf_counter() - start, tokens

    return measure


def timl_tokenize(data_file: Path, work: Path, num_proc: int, chunksize: int, whole_run: bool) -> Callable[[], tuple[float, int]]:
    runs = iter(range(10**6))

    def measure() -> tuple[float, int]:
        args = TokenizeArguments(
            cache_dir=str(work / f"shards_{num_proc}_{whole_run}_{next(runs)}"),
            dataset_path="parquet",
            data_files=[str(data_file)],
            encoding_name="gpt2",
            num_proc=num_proc,
            chunksize=chunksize,
        )
        summary = tokenize_dataset(args)
        return (summary.seconds if whole_run else summary.tokenize_seconds), summary.tokens

    return measure


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "no commit yet") + (" + uncommitted changes" if dirty else "")


def load_average() -> str:
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=4, help="copies of the corpus (~740k GPT-2 tokens each)")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunksize", type=int, default=64, help="documents per batch (the corpus has ~600)")
    parser.add_argument("--trials", type=int, default=5)
    options = parser.parse_args()

    import datasets

    global _encoding
    _encoding = load_tiktoken_encoding("gpt2")
    documents = python_docs_documents() * options.repeat
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data_file = work / "python_docs.parquet"
        datasets.Dataset.from_dict({"text": documents}).to_parquet(data_file)
        rows = {"raw tiktoken encode_ordinary_batch, 1 thread": raw_tiktoken(documents)}
        rows["raw tiktoken encode_ordinary_batch, 8 threads"] = raw_tiktoken(documents, threads=8)
        for num_proc in options.num_proc:
            if num_proc > 1:
                rows[f"raw tiktoken, {num_proc} processes x 1 thread"] = raw_tiktoken(documents, processes=num_proc)
            rows[f"timl tokenize, num_proc={num_proc}"] = timl_tokenize(data_file, work, num_proc, options.chunksize, False)
            rows[f"  ... whole run, num_proc={num_proc}"] = timl_tokenize(data_file, work, num_proc, options.chunksize, True)

        print(f"device: {cpu_name()}, {os.cpu_count()} CPU cores; commit {commit()}")
        print(f"load average (1, 5, 15 min) at the start: {load_average()}")
        print(f"text: {len(documents):,} documents, {sum(map(len, documents)) / 1e6:.1f} MB, best of {options.trials} rounds\n")
        best = {name: (float("inf"), 0) for name in rows}
        for _ in range(options.trials):
            for name, measure in rows.items():
                seconds, tokens = measure()
                best[name] = min(best[name], (seconds, tokens))
        baseline = best["raw tiktoken encode_ordinary_batch, 1 thread"]
        baseline_rate = baseline[1] / baseline[0]
        print(f"{'what':<48} {'tokens/s':>12} {'vs raw 1 thread':>16}")
        for name, (seconds, tokens) in best.items():
            print(f"{name:<48} {tokens / seconds:>12,.0f} {tokens / seconds / baseline_rate:>16.2f}")
        print("\n(timl's tokens include one end-of-text token per document, which raw tiktoken does not make)")
        print(f"load average (1, 5, 15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()

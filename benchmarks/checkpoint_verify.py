r"""What a checkpoint's manifest costs: the checksums at save and the verification at resume, on the CPU.

    python benchmarks/checkpoint_verify.py                      # Llama-3.2-1B: ~15 GB of RAM and of disk
    python benchmarks/checkpoint_verify.py --config_overrides num_hidden_layers=2,vocab_size=32000   # a smaller one

Builds the model in fp32 with AdamW's two moments filled in (what one step would leave, without the gradients' memory),
saves it with timl's Checkpointer in one process, then verifies it as `--resume_from_checkpoint` does: warm (the files
in the page cache) and, as root, cold (after `echo 3 > /proc/sys/vm/drop_caches`). For scale it also times a plain
read of the same files and xxh3 over a buffer in memory. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import xxhash

from timl.checkpoint import manager as checkpoint, state as manifest
from timl.model.build import build_config, build_model
from timl.optim import OptimizerSet


class TimedHashing:
    """Wraps file_entry (the ranks' own files, hashed by the Checkpointer; the shared ones, by write_manifest) to add
    up the seconds and bytes that the manifest's checksums take."""

    def __init__(self):
        self.seconds, self.bytes, self.real = 0.0, 0, checkpoint.file_entry

    def __call__(self, path: Path) -> dict:
        start = time.perf_counter()
        entry = self.real(path)
        self.seconds += time.perf_counter() - start
        self.bytes += entry["bytes"]
        return entry


def with_adam_moments(model: torch.nn.Module) -> torch.optim.AdamW:
    """An AdamW whose state holds both moments of every parameter, as after its first step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.no_grad():
        for parameter in model.parameters():
            optimizer.state[parameter] = {"step": torch.tensor(1.0), "exp_avg": parameter * 0.1,
                                          "exp_avg_sq": parameter.square() * 1e-3}
    return optimizer


def drop_page_cache() -> bool:
    """Empties the page cache (root only), so that the next read comes from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def seconds_of(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def read_only(directory: Path) -> None:
    buffer = bytearray(8 << 20)
    for path in directory.iterdir():
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def xxh3_in_memory(gigabytes: float = 1.0) -> float:
    """xxh3_64's throughput over a buffer already in memory, in GB/s."""
    data = os.urandom(int(gigabytes * 1e9))
    return gigabytes / seconds_of(lambda: xxhash.xxh3_64(data).digest())


def save_checkpoint(options: argparse.Namespace, output_dir: Path) -> tuple[int, float, TimedHashing]:
    """Builds the model and its AdamW state and saves them as step1/ with timl's Checkpointer in one process; returns
    the parameter count, the seconds of the whole save and what its checksums took. Everything built is freed on
    return, which leaves the page cache room for the checkpoint."""
    torch.manual_seed(0)
    model = build_model(build_config(options.model, options.config_overrides))
    optimizer = with_adam_moments(model)
    optimizers = OptimizerSet([optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)],
                              ["adamw"])
    one_process = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                  wait_for_everyone=lambda: None)
    saver = checkpoint.Checkpointer(SimpleNamespace(output_dir=str(output_dir), save_total_limit=None), one_process,
                                    model=model)
    loader = SimpleNamespace(state_dict=lambda: {"position": 0})
    hashing = TimedHashing()
    checkpoint.file_entry = manifest.file_entry = hashing
    try:
        save_seconds = seconds_of(lambda: saver.save(1, optimizers=optimizers, loader=loader, state={}))
    finally:
        checkpoint.file_entry = manifest.file_entry = hashing.real
    return sum(parameter.numel() for parameter in model.parameters()), save_seconds, hashing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--config_overrides", default=None, help="e.g. num_hidden_layers=2: a smaller shape")
    parser.add_argument("--output_dir", default=None, help="where to save (a temporary folder, deleted, by default)")
    options = parser.parse_args()

    output_dir = Path(options.output_dir or tempfile.mkdtemp(prefix="timl_checkpoint_verify_"))
    parameters, save_seconds, hashing = save_checkpoint(options, output_dir)
    gc.collect()
    directory = output_dir / "step1"
    checkpoint_bytes = sum(path.stat().st_size for path in directory.iterdir())
    results = {"model": options.model, "config_overrides": options.config_overrides, "parameters": parameters,
               "checkpoint_bytes": checkpoint_bytes, "save_seconds": round(save_seconds, 2),
               "save_checksum_seconds": round(hashing.seconds, 2),
               "save_checksum_gb_per_s": round(hashing.bytes / 1e9 / hashing.seconds, 2),
               "save_checksum_share_of_save": round(hashing.seconds / save_seconds, 3)}
    read_only(directory)  # the first read after the save may still come partly from the disk
    for cache in ("warm", "cold"):
        if cache == "cold" and not drop_page_cache():
            results["cold"] = "skipped: /proc/sys/vm/drop_caches is not writable (needs root)"
            continue
        problems: list[str] = []
        verify_seconds = seconds_of(lambda: problems.extend(checkpoint.verify(directory)))
        assert not problems, problems
        if cache == "cold":
            drop_page_cache()
        read_seconds = seconds_of(lambda: read_only(directory))
        results.update({f"verify_{cache}_seconds": round(verify_seconds, 2),
                        f"verify_{cache}_gb_per_s": round(checkpoint_bytes / 1e9 / verify_seconds, 2),
                        f"read_only_{cache}_gb_per_s": round(checkpoint_bytes / 1e9 / read_seconds, 2)})
    results.update({"xxh3_in_memory_gb_per_s": round(xxh3_in_memory(), 2), "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(), "xxhash": xxhash.VERSION})
    if options.output_dir is None:
        shutil.rmtree(output_dir)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

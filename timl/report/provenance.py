"""Where a run came from: library versions, the git commit, the machine. Written beside every log and checkpoint."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("timl", "torch", "transformers", "accelerate", "numpy", "tiktoken", "huggingface-hub", "safetensors",
             "liger-kernel", "cut-cross-entropy", "flash-attn", "wandb")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(directory: str | Path | None = None) -> str | None:
    """The commit of the checkout holding `directory` (default: timl's own source), with '+dirty' for local edits."""
    directory = Path(directory or Path(__file__).parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    return {
        "versions": library_versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }

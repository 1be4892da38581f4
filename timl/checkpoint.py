"""Checkpoint folders, written so that a crash mid-save never leaves one that looks complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def save_model(model: torch.nn.Module, directory: str | Path) -> Path:
    """Saves with `save_pretrained` (safetensors and config) into a temporary sibling, then renames it into place."""
    directory = Path(directory)
    temporary = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, safe_serialization=True)
    _replace_directory(temporary, directory)
    return directory


def copy_checkpoint(source: str | Path, destination: str | Path) -> Path:
    """Copies a finished checkpoint folder (for example step{N} to main), atomically."""
    destination = Path(destination)
    temporary = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary)
    _replace_directory(temporary, destination)
    return destination


def _replace_directory(temporary: Path, directory: Path) -> None:
    for path in temporary.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    if directory.exists():
        # A folder cannot be renamed over a non-empty one; move the old one aside first, then drop it.
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(temporary, directory)
        shutil.rmtree(old)
    else:
        os.replace(temporary, directory)

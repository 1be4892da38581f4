"""Each checkpoint's manifest: every file's size and checksum, recorded at the save and verified before a resume, so
that a truncated or altered file is named instead of failing deep in torch.

`manifest.json` covers every file of a step folder but trainer_state.json, which is written after it (its presence
marks the folder complete) and is checked by parsing it. Each rank hashes the files it wrote; verifying deals the
files out among the ranks, so that it costs about one read of the checkpoint in all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import xxhash

from timl.collectives import all_ranks, from_rank_0, rank_and_world_size
from timl.checkpoint.state import MANIFEST, METADATA, NON_TENSOR_STATE, TRAINER_STATE, read_json, write_json

logger = logging.getLogger(__name__)

REQUIRED_FILES = (METADATA, NON_TENSOR_STATE, TRAINER_STATE)
# xxh3 hashes faster than a disk or the page cache can deliver, so verifying costs one read of the checkpoint. It
# guards against truncation and corruption, not tampering: loading never runs pickled code anyway.
CHECKSUM = "xxh3_64"


def file_entry(path: Path) -> dict[str, Any]:
    """A file's size and checksum, as the manifest records them."""
    hasher, size = xxhash.xxh3_64(), 0
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            hasher.update(view[:count])
            size += count
    return {"bytes": size, CHECKSUM: hasher.hexdigest()}


def write_manifest(directory: Path, hashed: dict[str, dict[str, Any]]) -> None:
    """Records the size and checksum of every file in `directory` but trainer_state.json, which is written after it
    and checked by parsing it. `hashed` holds the entries already made (by the ranks that wrote those files)."""
    files = dict(hashed)
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in files and path.name not in (TRAINER_STATE, MANIFEST):
            files[path.name] = file_entry(path)
    write_json(directory / MANIFEST, {"checksum": CHECKSUM, "files": dict(sorted(files.items()))})


def _manifest_files(directory: Path) -> tuple[list[str], dict[str, dict[str, Any]] | None]:
    """The quick part of verifying a checkpoint: what is wrong so far, and the files its manifest lists (None when
    there is nothing more to check)."""
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        return [f"missing {', '.join(missing)}"], None
    try:
        state = read_json(directory / TRAINER_STATE)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("it holds no step")
    except (OSError, ValueError) as error:
        return [f"{TRAINER_STATE} is not a trainer state ({error})"], None
    if not (directory / MANIFEST).is_file():
        logger.warning("%s has no %s (timl saved it before it wrote manifests): its files cannot be verified.",
                       directory, MANIFEST)
        return [], None
    try:
        manifest = read_json(directory / MANIFEST)
        if manifest["checksum"] != CHECKSUM:
            return [f"{MANIFEST} uses the checksum {manifest['checksum']!r}, which this timl cannot check"], None
        return [], {name: {"bytes": int(entry["bytes"]), CHECKSUM: str(entry[CHECKSUM])}
                    for name, entry in manifest["files"].items()}
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as error:
        return [f"{MANIFEST} is not a manifest ({type(error).__name__}: {error})"], None


def _file_problem(directory: Path, name: str, expected: dict[str, Any]) -> str | None:
    try:
        size = (directory / name).stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size} bytes instead of {expected['bytes']} (truncated or overwritten)"
        actual = file_entry(directory / name)[CHECKSUM]
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as error:
        return f"{name} cannot be read ({error.strerror})"
    if actual != expected[CHECKSUM]:
        return f"{name} fails its checksum: {CHECKSUM} {actual}, not {expected[CHECKSUM]} (its contents changed)"
    return None


def verify(directory: str | Path) -> list[str]:
    """What is wrong with a checkpoint: missing files, sizes or checksums that differ from its manifest, a
    trainer_state.json that does not parse; [] when nothing is. A checkpoint saved before manifests is only checked
    for its files, with a warning. With a process group, every rank calls it: each reads its share of the files, and
    all get the whole answer."""
    directory = Path(directory)
    problems, files = from_rank_0(lambda: _manifest_files(directory))
    if files is None:
        return problems
    rank, world_size = rank_and_world_size()
    # Dealt out largest first, so that every rank reads about as much: each holds one shard of a similar size.
    share = sorted(files, key=lambda name: (-files[name]["bytes"], name))[rank::world_size]
    found = [problem for name in share if (problem := _file_problem(directory, name, files[name]))]
    return sorted(problem for problems in all_ranks(found) for problem in problems)

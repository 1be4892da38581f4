"""The binary shard format: a 1024-byte header of 256 little-endian int32 values, then the values.

timl writes its own format, byte for byte the original timl's:

    header[0] = 20250805 (magic), header[1] = 1 (version), header[2] = dtype id, header[3] = number of values

Token shards use dtype id 0 for uint16 and 1 for uint32. Float shards (a per-token side channel, such as loss
weights) use dtype id 0 for float32. The header cannot tell a token shard from a float shard, so the caller says
which kind it is reading.

timl also reads llm.c's shards, as used by modded-nanogpt's FineWeb10B files:

    GPT-2:    header[0] = 20240520, header[1] = 1, header[2] = number of tokens, uint16 tokens
    Llama 3:  header[0] = 20240801, header[1] = 7, header[2] = number of tokens, uint32 tokens
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from timl.checkpoint.durable import atomic_file

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

TIML_MAGIC = 20250805
TIML_VERSION = 1
LLMC_GPT2_MAGIC = 20240520
LLMC_LLAMA3_MAGIC = 20240801

ShardKind = Literal["tokens", "floats"]

_TIML_DTYPES: dict[ShardKind, dict[int, np.dtype]] = {
    "tokens": {0: np.dtype("<u2"), 1: np.dtype("<u4")},
    "floats": {0: np.dtype("<f4")},
}
# llm.c fixes the dtype by (magic, version) instead of storing an id.
_LLMC_FORMATS: dict[int, tuple[str, int, np.dtype]] = {
    LLMC_GPT2_MAGIC: ("llm.c GPT-2", 1, np.dtype("<u2")),
    LLMC_LLAMA3_MAGIC: ("llm.c Llama 3", 7, np.dtype("<u4")),
}


class ShardError(ValueError):
    """A shard file or file pattern that cannot be read as asked."""


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's header says: where its values are, their dtype and how many there are."""

    path: Path
    format: str
    dtype: np.dtype
    num_values: int

    def memmap(self, start: int = 0, stop: int | None = None) -> np.memmap:
        """Maps values [start, stop) of the file without reading them."""
        stop = self.num_values if stop is None else stop
        return np.memmap(
            self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES + start * self.dtype.itemsize, shape=(stop - start,)
        )


def read_header(path: str | os.PathLike, kind: ShardKind = "tokens") -> ShardInfo:
    """Reads and checks a shard's header, and checks that the file's size agrees with it."""
    path = Path(path)
    file_size = path.stat().st_size
    if file_size < HEADER_BYTES:
        raise ShardError(f"{path}: {file_size} bytes is too short to hold the {HEADER_BYTES}-byte shard header.")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version = int(header[0]), int(header[1])

    if magic == TIML_MAGIC:
        if version != TIML_VERSION:
            raise ShardError(f"{path}: timl shard version {version} is not supported (this timl reads version {TIML_VERSION}).")
        dtype_id, num_values = int(header[2]), int(header[3])
        dtypes = _TIML_DTYPES[kind]
        if dtype_id not in dtypes:
            known = ", ".join(f"{i} = {d.name}" for i, d in dtypes.items())
            raise ShardError(f"{path}: dtype id {dtype_id} is not a {kind} dtype (known: {known}).")
        info = ShardInfo(path, "timl", dtypes[dtype_id], num_values)
    elif magic in _LLMC_FORMATS:
        name, expected_version, dtype = _LLMC_FORMATS[magic]
        if kind != "tokens":
            raise ShardError(f"{path}: an {name} shard holds tokens, but a {kind} shard was expected.")
        if version != expected_version:
            raise ShardError(f"{path}: {name} shard version {version} is not supported (expected {expected_version}).")
        info = ShardInfo(path, name, dtype, int(header[2]))
    else:
        raise ShardError(
            f"{path}: unknown magic number {magic}; expected {TIML_MAGIC} (timl), "
            f"{LLMC_GPT2_MAGIC} (llm.c GPT-2) or {LLMC_LLAMA3_MAGIC} (llm.c Llama 3). Is this a shard file?"
        )

    if info.num_values < 0:
        raise ShardError(f"{path}: the header's value count {info.num_values} is negative.")
    expected_size = HEADER_BYTES + info.num_values * info.dtype.itemsize
    if file_size != expected_size:
        problem = "truncated" if file_size < expected_size else "padded"
        raise ShardError(
            f"{path}: the file is {problem}: its header promises {info.num_values} {info.dtype.name} values "
            f"({expected_size} bytes in all), but the file has {file_size} bytes."
        )
    return info


def list_shards(pattern: str | os.PathLike, kind: ShardKind = "tokens") -> list[ShardInfo]:
    """Reads the headers of every file matching the glob pattern, in sorted order."""
    paths = sorted(glob.glob(str(pattern)))
    if not paths:
        raise ShardError(f"No file matches the pattern {str(pattern)!r}.")
    return [read_header(path, kind) for path in paths]


def count_values(pattern: str | os.PathLike, kind: ShardKind = "tokens") -> int:
    """The number of values in all the files matching the pattern, from their headers alone."""
    return sum(info.num_values for info in list_shards(pattern, kind))


def write_shard(path: str | os.PathLike, values: np.ndarray) -> None:
    """Writes values in the timl format, atomically: a reader sees the whole file or no file at all.

    uint16 and uint32 values make a token shard; float32 values make a float shard.
    """
    path = Path(path)
    values = np.ascontiguousarray(values)
    dtype_ids = {np.dtype("uint16"): 0, np.dtype("uint32"): 1, np.dtype("float32"): 0}
    if values.ndim != 1 or values.dtype not in dtype_ids:
        raise ShardError(f"{path}: a shard holds a 1-D array of uint16, uint32 or float32, not {values.dtype}{list(values.shape)}.")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = (TIML_MAGIC, TIML_VERSION, dtype_ids[values.dtype], len(values))
    with atomic_file(path) as file:
        file.write(header.tobytes())
        file.write(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())

"""What --train_file_pattern and --eval_file_pattern name, and the default loaders over them.

    --train_file_pattern "data/train_*.bin"                                  one stream, as always
    --train_file_pattern "web=data/web/*.bin:0.7,code=data/code/*.bin:0.3"   a mixture: sequences drawn 70/30
    --eval_file_pattern "val=data/val_*.bin,code=data/code_val_*.bin"        two eval sets: eval_val_loss, ...

A value is split into sources only when it starts with `name=`, so a plain glob, even one holding a comma or a
colon, keeps its meaning. In a YAML or JSON arguments file the sources may also be a list of mappings with `name`,
`pattern` and (for training) `weight`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from timl.config.arguments import DataArguments
from timl.data.loader import BatchLoader, ShardLoader
from timl.data.mixture import MixtureLoader
from timl.data.shards import ShardError, list_shards

_NAMED = re.compile(r"\s*([A-Za-z_][\w.-]*)\s*=(.*)", re.S)


@dataclass(frozen=True)
class Source:
    """One named glob of token shards; `name` is None for the plain single-pattern form."""

    name: str | None
    pattern: str
    weight: float | None = None


def parse_sources(value: str | Sequence[Mapping[str, Any]], flag: str) -> list[Source]:
    """The sources a pattern argument names. Raises ValueError, naming `flag`, when the syntax is wrong."""
    if isinstance(value, str):
        if not _NAMED.match(value):
            return [Source(None, value)]
        sources = [_parse_entry(entry, flag) for entry in value.split(",")]
    else:
        sources = [_mapping_entry(entry, flag) for entry in value]
    if not sources:
        raise ValueError(f"{flag} names no sources")
    names = [source.name for source in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{flag} names {', '.join(duplicates)} more than once")
    return sources


def _parse_entry(entry: str, flag: str) -> Source:
    match = _NAMED.fullmatch(entry)
    if not match:
        raise ValueError(f"{flag}: {entry.strip()!r} has no name; write every source as name=glob or "
                         f"name=glob:weight, e.g. web=data/web/*.bin:0.7")
    name, rest = match[1], match[2].strip()
    pattern, colon, weight = rest.rpartition(":")
    try:
        return Source(name, pattern.strip(), float(weight)) if colon else Source(name, rest)
    except ValueError:  # a colon that is part of the path, not a weight
        return Source(name, rest)


def _mapping_entry(entry: Any, flag: str) -> Source:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry.get("pattern"):
        raise ValueError(f"{flag}: each source of a list needs a name and a pattern, got {entry!r}")
    unknown = set(entry) - {"name", "pattern", "weight"}
    if unknown:
        raise ValueError(f"{flag}: source {entry['name']!r} has unknown keys {', '.join(sorted(unknown))}")
    weight = entry.get("weight")
    return Source(entry["name"], str(entry["pattern"]), None if weight is None else float(weight))


def source_problems(flag: str, value: str | Sequence[Mapping[str, Any]] | None, *, weighted: bool) -> list[str]:
    """Everything wrong with a pattern argument (syntax, weights, files), for TrainingArguments to report."""
    if value is None:
        return []
    try:
        sources = parse_sources(value, flag)
    except ValueError as error:
        return [str(error)]
    problems = []
    weights = [source.weight for source in sources]
    if not weighted and any(weight is not None for weight in weights):
        problems.append(f"{flag}: eval sets take no weights (got {', '.join(s.name for s in sources if s.weight is not None)})")
    if weighted and len(sources) > 1 and None in weights and any(weight is not None for weight in weights):
        problems.append(f"{flag}: give every source a weight, or none (equal weights)")
    for source in sources:
        if source.weight is not None and not 0 < source.weight < float("inf"):
            problems.append(f"{flag}: source {source.name!r} has weight {source.weight:g}; weights must be positive and finite")
        try:
            list_shards(source.pattern)
        except (ShardError, OSError) as error:
            problems.append(f"{flag}: {f'source {source.name!r}: ' if source.name else ''}{error}")
    return problems


def is_mixture(value: str | Sequence[Mapping[str, Any]] | None) -> bool:
    """Whether a --train_file_pattern names several sources (which then have no single epoch)."""
    try:
        return value is not None and len(parse_sources(value, "")) > 1
    except ValueError:
        return False


def train_loader(data: DataArguments, accelerator: Any, *, vocab_size: int | None, seed: int) -> BatchLoader:
    """The default train loader factory: a repeating ShardLoader over --train_file_pattern, or a MixtureLoader over
    its sources; shuffled with --shuffle, in an order drawn from `seed` (--seed)."""
    if data.train_file_pattern is None:
        raise ValueError("--train_file_pattern is needed to load train data (or pass a train_loader_factory).")
    sources = parse_sources(data.train_file_pattern, "--train_file_pattern")
    common = dict(block_size=data.block_size, per_device_batch_size=data.per_device_train_batch_size,
                  rank=accelerator.process_index, world_size=accelerator.num_processes, device=accelerator.device,
                  vocab_size=vocab_size, shuffle=data.shuffle, seed=seed)
    if len(sources) == 1:
        return ShardLoader(sources[0].pattern, repeat=True, **common)
    return MixtureLoader({s.name: (s.pattern, 1.0 if s.weight is None else s.weight) for s in sources}, **common)


def eval_loader(data: DataArguments, accelerator: Any, *, pattern: str, vocab_size: int | None) -> ShardLoader:
    """One eval set, whole: every token once, the last batch padded, the same number of batches on every rank."""
    return ShardLoader(pattern, block_size=data.block_size, per_device_batch_size=data.per_device_eval_batch_size,
                       rank=accelerator.process_index, world_size=accelerator.num_processes, device=accelerator.device,
                       max_tokens=data.max_eval_tokens, vocab_size=vocab_size, pad_last=True)


def eval_loader_factories(data: DataArguments, custom: Callable[[Any, Any], BatchLoader] | None,
                          vocab_size: int | None) -> dict[str, Callable[[Any, Any], BatchLoader]]:
    """Metric prefix -> loader factory: {"eval_": ...} for a custom factory or one unnamed pattern, and
    "eval_<name>_" for each named eval set; empty without --eval_file_pattern."""
    if custom is not None:
        return {"eval_": custom}
    if data.eval_file_pattern is None:
        return {}
    return {"eval_" if source.name is None else f"eval_{source.name}_":
            functools.partial(eval_loader, pattern=source.pattern, vocab_size=vocab_size)
            for source in parse_sources(data.eval_file_pattern, "--eval_file_pattern")}

"""Reading arguments: the flat command line, or one YAML or JSON file of the same names, into the argument groups.

    model_args, args = parse_args(ModelArguments, TrainingArguments)

TrainingArguments stands for its groups (timl/config/arguments.py): the parser gets each group, so the command line
stays flat, and the parsed groups are put together into one TrainingArguments.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from argparse import ArgumentTypeError
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml
from transformers import HfArgumentParser

from timl.config.arguments import AUTO_MICRO_BATCH, REMOVED_FLAGS, TrainingArguments

# timl/data/sources.py also reads these as a list of {name, pattern, weight} mappings, which only a file can hold.
SOURCE_LIST_FIELDS = ("train_file_pattern", "eval_file_pattern")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a float needs a dot: 1e-5 is a string, even inside a mapping such as
    lr_scheduler_kwargs, whose values no field type converts. This loader reads them as YAML 1.2 and JSON do."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+.0123456789"))


def parse_args(*dataclass_types: type, argv: list[str] | None = None,
               defaults: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """Parses the command line into one object of each given type; a single .yaml, .yml or .json argument is read
    as a file, whose values are converted to each field's type as the command line's are (`file_arguments`).
    TrainingArguments is parsed as its groups and put together from them. `defaults` replaces fields' defaults by
    their flat names (a recipe's own defaults; --help shows them)."""
    parsed_types = [group for dtype in dataclass_types for group in _groups(dtype)]
    parser = HfArgumentParser(parsed_types)
    defaults = dict(defaults or {})
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"parse_args: defaults for arguments that do not exist: {', '.join(unknown)}")
    parser.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else argv
    refuse_removed_flags(argv)
    argv = _auto_as_zero(argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        parsed = list(parser.parse_dict({**defaults, **file_arguments(argv[0], parser)}))
    else:
        parsed = list(parser.parse_args_into_dataclasses(args=argv))
    results = []
    for dtype in dataclass_types:
        if dtype is TrainingArguments:
            groups = [parsed.pop(0) for _ in TrainingArguments.GROUPS]
            results.append(TrainingArguments(**dict(zip(TrainingArguments.GROUPS, groups))))
        else:
            results.append(parsed.pop(0))
    return tuple(results)


def refuse_removed_flags(argv: list[str]) -> None:
    """Ends the process, as argparse does for a bad flag, with one line per removed flag naming its replacement."""
    named = [word[2:].split("=", 1)[0].replace("-", "_") for word in argv if word.startswith("--")]
    removed = [f"--{name} was removed: use {REMOVED_FLAGS[name]}" for name in named if name in REMOVED_FLAGS]
    if removed:
        print("\n".join(f"timl: {line}" for line in removed), file=sys.stderr)
        raise SystemExit(2)


def _auto_as_zero(argv: list[str]) -> list[str]:
    """--per_device_train_batch_size auto, as the integer field holds it (AUTO_MICRO_BATCH)."""
    flags = ("--per_device_train_batch_size", "--per-device-train-batch-size")
    words = list(argv)
    for index, word in enumerate(words):
        if word in flags and index + 1 < len(words) and words[index + 1] == "auto":
            words[index + 1] = str(AUTO_MICRO_BATCH)
        elif word.split("=", 1)[0] in flags and word.endswith("=auto"):
            words[index] = f"{word.split('=', 1)[0]}={AUTO_MICRO_BATCH}"
    return words


def _groups(dataclass_type: type) -> list[type]:
    return list(TrainingArguments.GROUPS.values()) if dataclass_type is TrainingArguments else [dataclass_type]


def file_arguments(path: str, parser: HfArgumentParser) -> dict[str, Any]:
    """A YAML or JSON arguments file's values, each converted by the command line's own converter for its field.

    The dataclasses take values as they come, and YAML and JSON type them by their own rules: YAML 1.1 reads 1e-3
    (no dot) as a string, which would reach the optimizer as one. Every value that does not convert, and every
    unknown name, is reported in one error that names the file, before any model is built.
    """
    with open(path, encoding="utf-8") as file:
        values = json.load(file) if path.endswith(".json") else yaml.load(file, Loader=_YamlLoader)
    values = {} if values is None else values  # an empty YAML file: every default
    if not isinstance(values, dict):
        raise ValueError(f"{path} must map argument names to values, not hold a {type(values).__name__}")
    hints = {}
    for dtype in parser.dataclass_types:
        # Not each field's .type: HfArgumentParser narrows those in place (dict | str | None to str).
        dtype_hints = get_type_hints(dtype)
        hints.update({f.name: dtype_hints[f.name] for f in dataclasses.fields(dtype) if f.init})
    # argparse keeps its actions in _actions; each holds the converter and choices HfArgumentParser gave its field.
    actions = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
    unknown = [name for name in values if name not in hints]
    problems = [f"{name} was removed: use {REMOVED_FLAGS[name]}" for name in unknown if name in REMOVED_FLAGS]
    others = [name for name in unknown if name not in REMOVED_FLAGS]
    problems += [f"unknown arguments: {', '.join(others)}"] if others else []
    converted = {}
    for name, value in values.items():
        if name in unknown:
            continue
        try:
            converted[name] = _file_value(name, value, hints[name], actions[name])
        except (ValueError, TypeError, ArgumentTypeError):
            problems.append(f"{name}: expected {_expected(hints[name], actions[name])}, got {value!r}")
    if problems:
        raise ValueError(f"Invalid arguments in {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return converted


def _file_value(name: str, value: Any, hint: Any, action: Any) -> Any:
    """One value of an arguments file, as the command line would give it. Null, and the mappings and lists that
    only a file can hold, are kept where the field takes them."""
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    if name == "per_device_train_batch_size" and value == "auto":
        return AUTO_MICRO_BATCH
    if isinstance(value, dict) and any((get_origin(option) or option) is dict for option in options):
        return value
    if isinstance(value, list) and name in SOURCE_LIST_FIELDS:
        return value
    if isinstance(value, list) and action.nargs == "+":  # a list field, whose items the command line takes apart
        return [_converted(name, item, action) for item in value]
    return _converted(name, value, action)


def _converted(name: str, value: Any, action: Any) -> Any:
    """A single value through the field's command-line converter, as its text, then checked against its choices."""
    if value is None or isinstance(value, (dict, list)):
        raise TypeError(f"{name} takes no {type(value).__name__}")
    # A YAML or JSON true is the command line's text "true" (str gives "True").
    converted = action.type(str(value).lower() if isinstance(value, bool) else str(value))
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{converted!r} is not a choice of {name}")
    return converted


def _expected(hint: Any, action: Any) -> str:
    """What a field takes, in words for an error: its choices, or its type as declared."""
    if action.choices:
        return f"one of {', '.join(map(str, action.choices))}"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")

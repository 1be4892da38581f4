"""docs/arguments.md, the table of every argument of `timl train`, generated from the argument dataclasses so that it
cannot drift from them.

    python -m timl.docs            # prints docs/arguments.md as the code makes it
    python -m timl.docs --write    # rewrites docs/arguments.md (tests/test_docs.py checks that it is up to date)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from timl.checkpoint.durable import atomic_file

ARGUMENTS_DOC = Path(__file__).resolve().parent.parent / "docs" / "arguments.md"

INTRODUCTION = """\
# Every argument

`timl train` and `recipes/gpt2_c4.py` take these arguments, as flags (`--learning_rate 3e-4`) or from a YAML or
JSON file (`timl train args.yaml`, see [training.md](training.md)); the other recipes and the examples take them
too, some with other defaults. `timl train --help` prints them with their defaults. Each section is one dataclass of
the code, headed by its docstring.

This file is generated from the dataclasses by `python -m timl.docs --write`; do not edit it by hand.
`tests/test_docs.py` fails when it differs from what the code generates.
"""


def argument_classes() -> list[type]:
    """The dataclasses that `timl train` parses, in the order of its flags: the one list to change when they are
    regrouped. TrainingArguments is parsed as its groups (timl.config.parsing), so it is listed as them."""
    from timl.config import ModelArguments, TrainingArguments

    return [ModelArguments, *TrainingArguments.GROUPS.values()]


def heading(dataclass_type: type) -> str:
    """The first line of the type's own docstring, or its name when it has none (dataclasses make one up)."""
    doc = (dataclass_type.__doc__ or "").strip()
    if not doc or doc.startswith(f"{dataclass_type.__name__}("):
        return dataclass_type.__name__
    return doc.splitlines()[0].rstrip(".")


def default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()}`"
    return "required"


def argument_section(dataclass_type: type) -> str:
    """One dataclass's arguments: a heading from its docstring, where it lives, and a row per command-line flag."""
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(dataclass_type):
        if not field.init:  # HfArgumentParser makes no flag of it
            continue
        meaning = " ".join(field.metadata.get("help", "").split()).replace("|", "\\|")
        rows.append(f"| `--{field.name}` | {default_text(field)} | {meaning} |")
    where = f"`{dataclass_type.__module__}.{dataclass_type.__qualname__}`"
    return f"## {heading(dataclass_type)}\n\n{where}\n\n" + "\n".join(rows) + "\n"


def arguments_doc(dataclass_types: Sequence[type] | None = None) -> str:
    """The whole of docs/arguments.md: an introduction, then one section per dataclass."""
    types = argument_classes() if dataclass_types is None else dataclass_types
    return "\n".join([INTRODUCTION, *(argument_section(dataclass_type) for dataclass_type in types)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timl.docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"rewrite {ARGUMENTS_DOC} instead of printing it")
    args = parser.parse_args(argv)
    text = arguments_doc()
    if args.write:
        ARGUMENTS_DOC.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(ARGUMENTS_DOC, "w") as file:
            file.write(text)
        print(f"wrote {ARGUMENTS_DOC}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

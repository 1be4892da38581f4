"""The README's table of every argument, generated from the dataclasses so that it cannot drift.

    python -m timl.docs    # prints the table; tests/test_docs.py checks that the README holds it
"""

from __future__ import annotations

import dataclasses

from timl.config.arguments import TrainingArguments
from timl.train.pretrain import ModelArguments

START, END = "<!-- arguments:start -->", "<!-- arguments:end -->"


def argument_table(*dataclass_types: type) -> str:
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for dataclass_type in dataclass_types:
        for field in dataclasses.fields(dataclass_type):
            default = field.default if field.default is not dataclasses.MISSING else "required"
            meaning = field.metadata.get("help", "").replace("|", "\\|")
            rows.append(f"| `--{field.name}` | `{default}` | {meaning} |")
    return "\n".join(rows)


def readme_section() -> str:
    return f"{START}\n{argument_table(ModelArguments, TrainingArguments)}\n{END}"


if __name__ == "__main__":
    print(readme_section())

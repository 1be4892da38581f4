"""docs/arguments.md is what the dataclasses generate, and every entry point's --help lists every argument."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from timl.docs import ARGUMENTS_DOC, argument_classes, argument_section, arguments_doc, heading

ROOT = Path(__file__).resolve().parent.parent


def test_docs_arguments_md_is_what_the_dataclasses_generate():
    assert ARGUMENTS_DOC == ROOT / "docs" / "arguments.md"
    assert ARGUMENTS_DOC.read_text(encoding="utf-8") == arguments_doc(), (
        "docs/arguments.md is out of date with the argument dataclasses: regenerate it with "
        "`python -m timl.docs --write`")


def test_each_dataclass_is_a_section_headed_by_its_docstring():
    @dataclasses.dataclass
    class First:
        """The first group.

        More about it, which the heading leaves out."""

        alpha: int = dataclasses.field(default=1, metadata={"help": "A | B, on\n  two lines."})
        beta: list[str] = dataclasses.field(default_factory=list, metadata={"help": "A list."})
        derived: int = dataclasses.field(default=0, init=False)

    @dataclasses.dataclass
    class Second:
        gamma: str = dataclasses.field(metadata={"help": "Needed."})

    text = arguments_doc([First, Second])
    assert heading(First) == "The first group" and heading(Second) == "Second"
    assert text.index("## The first group") < text.index("`--alpha`") < text.index("## Second") < text.index("--gamma")
    assert "| `--alpha` | `1` | A \\| B, on two lines. |" in text
    assert "| `--beta` | `[]` | A list. |" in text
    assert "| `--gamma` | required | Needed. |" in text
    assert "--derived" not in text  # no flag of the parser
    assert argument_section(First) in text and argument_section(Second) in text


def test_python_m_timl_docs_prints_the_file():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "timl.docs"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == arguments_doc()


def help_text(command: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


@pytest.mark.parametrize("command", [["-m", "timl", "train"], ["recipes/gpt2_c4.py"], ["recipes/quickstart.py"]])
def test_help_lists_every_argument_with_its_default(command):
    text = help_text(command)
    fields = [field for dataclass_type in argument_classes() for field in dataclasses.fields(dataclass_type)
              if field.init]
    for field in fields:
        assert f"--{field.name}" in text, field.name
    assert text.count("(default:") >= len(fields)


def test_argument_classes_are_every_flag_of_timl_train():
    # Guards argument_classes() when the dataclasses are regrouped: a flag of `timl train` that it misses would be
    # missing from docs/arguments.md.
    documented = {field.name for dataclass_type in argument_classes() for field in dataclasses.fields(dataclass_type)}
    # Each --name, with transformers' --dashed-alias of it read as the name; bool fields also get --no_name.
    help_flags = re.findall(r"(?<![\w-])--(\w[\w-]*)", help_text(["-m", "timl", "train"]))
    flags = {flag.replace("-", "_") for flag in help_flags}
    flags = {flag for flag in flags if flag != "help" and not (flag.startswith("no_") and flag[3:] in documented)}
    assert flags <= documented, f"flags of `timl train` missing from timl.docs.argument_classes(): {flags - documented}"


def test_every_test_that_tests_readme_names_exists():
    text = (ROOT / "tests" / "README.md").read_text(encoding="utf-8")
    names = re.findall(r"`([\w/]+\.py)::(\w+|\*)`", text)
    assert len(names) > 50
    missing = []
    for file, name in names:
        path = ROOT / "tests" / file
        if not path.is_file() or (name != "*" and not re.search(rf"^def {name}\(", path.read_text(), re.M)):
            missing.append(f"{file}::{name}")
    assert not missing, f"tests/README.md names tests that do not exist: {missing}"


def anchor(heading_text: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading_text.strip().lower()).replace(" ", "-")


def test_every_link_between_the_readme_and_the_docs_resolves():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "README.md"]
    broken = []
    for document in documents:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text(encoding="utf-8")):
            if re.match(r"\w+://", target):
                continue
            path, _, fragment = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            if not linked.exists():
                broken.append(f"{document.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and linked.is_file():
                headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.M)
                if fragment not in {anchor(heading) for heading in headings}:
                    broken.append(f"{document.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)

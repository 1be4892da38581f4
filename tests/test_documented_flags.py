"""Every --flag that README.md and docs/*.md give to a timl command is a flag of that command.

A documented command is a line of a shell code block (continuation lines joined), or an inline code span, that runs
`timl train | tokenize | plot`, `python -m timl ...`, or a script of recipes/ or examples/, directly, under `uv run`,
or under `accelerate launch` or `torchrun`. The launcher's own flags (--config_file, --nproc_per_node, ...) come
before the command starts, at `-m MODULE` or at the script, and are not checked. Flags in a comment at the end of the
line count as the command's.

Each command's flags are those of the parser it really builds: the test runs the command's entry point in this
process until it asks its parser to parse, and stops it there. A flag named in prose (an inline code span that runs
no command, such as `--save_total_limit N`) must be a flag of one of timl's commands or of a launcher.
"""

from __future__ import annotations

import argparse
import functools
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
LAUNCHERS = {"python", "python3", "torchrun", "accelerate"}
# SLURM's options that the docs name in prose (sbatch's and squeue's; tests/test_slurm.py checks each against the
# real commands' --help).
SLURM_FLAGS = frozenset({"--nodes", "--requeue", "--signal", "--gpus-per-node", "--ntasks-per-node",
                         "--time", "--cpus-per-task"})
SCRIPT_FOLDERS = ("recipes/", "examples/")
ENVIRONMENT_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Command:
    line: int
    target: tuple[str, ...]  # ("module", "timl", "train"), ("module", "timl.docs") or ("script", "recipes/x.py")
    flags: tuple[tuple[int, str], ...]  # each flag with the line it is on

    @property
    def name(self) -> str:
        kind, *words = self.target
        if kind == "script":
            return f"python {words[0]}"
        return " ".join(words) if words[0] == "timl" else f"python -m {words[0]}"


def command_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """Each command line of a shell code block, as its physical lines (a line ending in a backslash goes on), then
    each inline code span, with the number of its first line."""
    fence, pending = None, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip() or "text")
        elif fence in SHELL_LANGUAGES:
            pending.append(stripped.removesuffix("\\"))
            if not stripped.endswith("\\"):
                yield number - len(pending) + 1, pending
                pending = []
    yield from inline_spans(text)


def inline_spans(text: str) -> Iterator[tuple[int, list[str]]]:
    """Each inline code span outside code blocks, as its lines (a span may wrap), with the number of its first."""
    prose, fence = [], False  # code lines are blanked, so that each span keeps its line number
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fence = not fence
        prose.append("" if fence or line.strip().startswith("```") else line)
    joined = "\n".join(prose)
    for span in re.finditer(r"(`+)((?:(?!\n\s*\n).)+?)\1", joined, re.S):  # never across a blank line
        yield joined.count("\n", 0, span.start()) + 1, span.group(2).splitlines()


def split_comment(line: str) -> tuple[str, str]:
    """The shell code of a line, and its trailing comment: from the first # that starts a word outside quotes."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index], line[index + 1:]
    return line, ""


def find_command(words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """The timl command the words run, and the words given to it; None for any other command."""
    words = list(words)
    while words and (ENVIRONMENT_ASSIGNMENT.match(words[0]) or words[0] == "$"):
        words.pop(0)
    if words[:2] == ["uv", "run"]:
        words = words[2:]
    if words[:1] == ["srun"]:  # SLURM's launcher, with its own options
        words = words[1:]
        while words and words[0].startswith("-"):
            words.pop(0)
    if words[:1] == ["sbatch"]:  # SLURM's submission: its options, the job script, then what the script passes on
        script = next((index for index, word in enumerate(words) if word.endswith(".sbatch")), None)
        return None if script is None else (("module", "timl", "train"), words[script + 1:])
    if words[:2] in (["bash", "-c"], ["sh", "-c"]) and len(words) > 2:
        try:
            return find_command(shlex.split(words[2]))
        except ValueError:
            return None
    if not words or words[0] not in LAUNCHERS | {"timl"}:
        return None
    if words[0] == "timl":
        return subcommand(["timl", *words[1:]])
    rest = words[2:] if words[:2] == ["accelerate", "launch"] else words[1:]
    for index, word in enumerate(rest):
        if word == "-m" and index + 1 < len(rest):
            module, given = rest[index + 1], rest[index + 2:]
            if module == "timl":
                return subcommand(["timl", *given])
            return (("module", module), given) if module.startswith("timl.") else None
        if word.endswith(".py"):
            return (("script", word), rest[index + 1:]) if word.startswith(SCRIPT_FOLDERS) else None
    return None


def subcommand(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    if len(words) > 1 and not words[1].startswith("-"):
        return ("module", "timl", words[1]), words[2:]
    return ("module", "timl"), words[1:]


def documented_commands(text: str) -> list[Command]:
    return sorted(_commands(text), key=lambda command: command.line)


def _commands(text: str) -> Iterator[Command]:
    for number, lines in command_lines(text):
        code, comment = split_comment(" ".join(lines))
        try:
            words = shlex.split(code)
        except ValueError:  # not shell: prose in backticks
            continue
        # One line may run several commands: `a && b`, `a | b`.
        commands, current = [], []
        for word in words:
            if word in SEPARATORS:
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
        for index, command_words in enumerate(commands):
            found = find_command(command_words)
            if found is None:
                continue
            target, given = found
            flags = [word.split("=", 1)[0] for word in given if FLAG.fullmatch(word.split("=", 1)[0])]
            if index == len(commands) - 1:
                flags += FLAG.findall(comment)
            flags = [flag for flag in flags if flag != "--help"]
            yield Command(number, target, tuple(zip(flag_lines(lines, flags, number), flags)))


def flag_lines(lines: list[str], flags: list[str], first: int) -> list[int]:
    """The line of each flag, in order: the first physical line at or after the previous flag's that holds it."""
    numbers, at = [], 0
    for flag in flags:
        pattern = re.compile(rf"(?<![\w-]){re.escape(flag)}(?![\w-])")
        at = next((index for index in range(at, len(lines)) if pattern.search(lines[index])), at)
        numbers.append(first + at)
    return numbers


class ParserReached(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("the command built its parser")
        self.parser = parser


def _stop_at_parse(parser: argparse.ArgumentParser, *args, **kwargs):
    raise ParserReached(parser)


@functools.cache
def command_flags(target: tuple[str, ...]) -> frozenset[str]:
    """Every option string of the parser that the command builds, as it builds it."""
    kind, name, *rest = target
    argv = [name, *rest]
    saved_path = list(sys.path)
    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_known_args", _stop_at_parse), \
                mock.patch.object(sys, "argv", argv):
            if kind == "module":
                with warnings.catch_warnings():  # runpy warns when the module was imported before, as timl.docs is
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                script = ROOT / name
                assert script.is_file(), f"{name} does not exist"
                sys.path.insert(0, str(script.parent))  # as `python script.py` does: examples import small_run
                runpy.run_path(str(script), run_name="__main__")
    except ParserReached as reached:
        return frozenset(option for action in reached.parser._actions for option in action.option_strings)
    except SystemExit:
        pass  # the command printed its usage and exited: it parses no flags
    finally:
        sys.path[:] = saved_path
    raise AssertionError(f"{' '.join(argv)} ended without parsing its arguments")


def unknown_flags(path: Path) -> list[str]:
    """'FILE:LINE: --flag is not a flag of `COMMAND`' for each documented flag that its command lacks."""
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [f"{shown}:{line}: {flag} is not a flag of `{command.name}`"
            for command in documented_commands(path.read_text(encoding="utf-8"))
            for line, flag in command.flags if flag not in command_flags(command.target)]


def prose_flags(text: str) -> Iterator[tuple[int, str]]:
    """The flags named in inline code spans that run no timl command (`--save_total_limit N`), with their lines."""
    for number, lines in inline_spans(text):
        try:
            words = shlex.split(split_comment(" ".join(lines))[0])
        except ValueError:
            words = []
        if words and find_command(words) is not None:
            continue  # a command: its flags are checked against its own parser
        flags = FLAG.findall(" ".join(lines))
        yield from zip(flag_lines(lines, flags, number), flags)


@functools.cache
def every_known_flag() -> frozenset[str]:
    """The flags of timl's commands, and those of the launchers that start them."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    flags = set().union(*(command_flags(("module", "timl", name)) for name in ("train", "tokenize", "plot")))
    for parser in (launch_command_parser(), get_args_parser()):
        flags |= {option for action in parser._actions for option in action.option_strings}
    return frozenset(flags | SLURM_FLAGS)


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(path.relative_to(ROOT)) for path in DOCUMENTS])
def test_every_flag_named_in_prose_is_a_flag_of_timl_or_of_a_launcher(path):
    shown = path.relative_to(ROOT)
    problems = [f"{shown}:{line}: {flag} is a flag of no timl command and no launcher"
                for line, flag in prose_flags(path.read_text(encoding="utf-8")) if flag not in every_known_flag()]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(path.relative_to(ROOT)) for path in DOCUMENTS])
def test_every_documented_flag_is_a_flag_of_its_command(path):
    problems = unknown_flags(path)
    assert not problems, "flags that no command takes (see `timl train --help`, docs/arguments.md):\n" + "\n".join(
        problems)


def test_the_docs_give_flags_to_every_timl_command():
    # Guards the test above against finding no command at all (a changed fence, a new launcher spelling).
    readme = {command.target for command in documented_commands(DOCUMENTS[0].read_text()) if command.flags}
    assert ("module", "timl", "train") in readme
    everywhere = {command.target for path in DOCUMENTS for command in documented_commands(path.read_text())
                  if command.flags}
    assert {("module", "timl", "train"), ("module", "timl", "tokenize"), ("module", "timl", "plot")} <= everywhere


SCRATCH_LINES = """
```bash
accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 8 -m timl train \\
  --model_name gpt2 --no_such_training_flag 1
ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 --nnodes 1 recipes/quickstart.py --data_dir data/x --max_steps 3
uv run timl tokenize --cache_dir data/x --dataset_path text --encoding_name gpt2   # add --not_a_tokenize_flag
uv run pytest -n 2 --dist loadfile
srun --nodes=2 bash -c 'accelerate launch --machine_rank $SLURM_NODEID -m timl train --output_dir x --bogus 1'
```

Inline, `timl plot runs/a --out cmp --log_y --logy`, and `--anything` alone is prose, as is `--num_processes`.
"""


def test_a_bogus_flag_in_a_scratch_copy_of_a_doc_is_caught_with_its_file_and_line(tmp_path):
    original = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    scratch = tmp_path / "training.md"
    scratch.write_text(original + SCRATCH_LINES, encoding="utf-8")
    first = len(original.splitlines()) + 3  # the line where the scratch code block's first command starts
    assert unknown_flags(scratch) == [
        f"{scratch}:{first + 1}: --no_such_training_flag is not a flag of `timl train`",
        f"{scratch}:{first + 2}: --max_steps is not a flag of `python recipes/quickstart.py`",
        f"{scratch}:{first + 3}: --not_a_tokenize_flag is not a flag of `timl tokenize`",
        f"{scratch}:{first + 5}: --bogus is not a flag of `timl train`",
        f"{scratch}:{first + 8}: --logy is not a flag of `timl plot`",
    ]
    assert [flag for flag in prose_flags(scratch.read_text()) if flag[1] not in every_known_flag()] == [
        (first + 8, "--anything")]

"""The README's two commands are the ones the project really runs, and its library example trains."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from timl.data.shards import write_shard

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_the_quickstart_and_the_test_command():
    quickstart, tests = readme_commands()
    assert quickstart.startswith("uv run ") and "quickstart" in quickstart
    assert tests == "uv run pytest -n 2 --dist loadfile"


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_commands()[1] in ci_lines


def test_the_library_example_trains_with_its_loss_and_metric(tmp_path):
    example = re.search(r"## Library use\n.*?```python\n(.*?)```", README, re.S).group(1)
    # Random tokens where the example expects the quickstart's shards: the example is run word for word.
    tokens = np.random.default_rng(0).integers(0, 50257, size=24_000, dtype=np.uint16)
    (tmp_path / "data" / "python_docs").mkdir(parents=True)
    write_shard(tmp_path / "data" / "python_docs" / "train_000000.bin", tokens[:20_000])
    write_shard(tmp_path / "data" / "python_docs" / "validation_000000.bin", tokens[20_000:])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "runs" / "library" / "metrics.jsonl").read_text().splitlines()]
    assert any("train_top5" in line for line in lines)
    evaluation = [line for line in lines if "eval_loss" in line][-1]
    assert 0 <= evaluation["eval_top5"] <= 1 and evaluation["eval_perplexity"] > 1
    assert (tmp_path / "runs" / "library" / "main" / "config.json").is_file()


def tree_paths() -> set[str]:
    """The paths that the README's annotated file tree names, rebuilt from its indentation (two spaces a level)."""
    block = re.search(r"## What is where\n.*?```\n(.*?)```", README, re.S).group(1)
    paths, parents = set(), []
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        indent, name = len(match.group(1)), match.group(2)
        if indent % 2 or not re.fullmatch(r"[\w.]+/?", name):
            continue  # an annotation's second line
        parents = parents[: indent // 2]
        paths.add("".join(parents) + name)
        if name.endswith("/"):
            parents.append(name)
    return paths


def test_the_file_tree_lists_every_module_of_the_package_and_nothing_else():
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "timl").rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py")}
    listed = {path for path in tree_paths() if path.startswith("timl/") and path.endswith(".py")}
    assert listed == modules, f"missing from the README's tree: {sorted(modules - listed)}; " \
                              f"in the tree but not in timl/: {sorted(listed - modules)}"
    for path in tree_paths():
        assert (ROOT / path).exists(), f"the README's tree names {path}, which does not exist"

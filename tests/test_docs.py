"""The README's argument table is the dataclasses', and every entry point's --help lists every argument."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from timl.config.arguments import TrainingArguments
from timl.docs import readme_section
from timl.train.pretrain import ModelArguments

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_argument_table_matches_the_dataclasses():
    assert readme_section() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("recipe", ["gpt2_c4.py", "quickstart.py"])
def test_recipe_help_lists_every_argument_with_its_default(recipe):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / recipe), "--help"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for field in [*dataclasses.fields(ModelArguments), *dataclasses.fields(TrainingArguments)]:
        assert f"--{field.name}" in text, field.name
    assert text.count("(default:") >= len(dataclasses.fields(TrainingArguments))

"""Every accelerate config in accelerate_configs/ loads with Accelerate's own parser, and every key is commented."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "accelerate_configs").glob("*.yaml"))


def test_the_five_configs_exist():
    assert {path.stem for path in CONFIGS} == {"single_gpu", "multi_gpu", "multi_node", "cpu", "fsdp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_parses_with_accelerate(path):
    config = ClusterConfig.from_yaml_file(path)
    expected = {"cpu": "NO", "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU", "fsdp": "FSDP"}
    assert config.distributed_type.value == expected[path.stem]
    assert config.use_cpu == (path.stem == "cpu")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_key_carries_a_comment(path):
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"{path.name}: no comment on {line!r}"

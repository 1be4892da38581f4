"""Every script in examples/ runs as a user would run it, on tiny shards, and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.data.shards import list_shards

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--config_overrides", TINY_GPT2, "--block_size", "16", "--train_batch_size", "8",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_eval_tokens", "640",
            "--max_train_steps", "4", "--log_every_steps", "1", "--eval_every_steps", "2", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_learnable_shards(directory, 2048, "train")
    write_learnable_shards(directory, 640, "validation", seed=1)
    return directory


def run_example(name: str, data: Path, output_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--output_dir", str(output_dir),
            "--train_file_pattern", str(data / "train_*.bin"), "--eval_file_pattern", str(data / "validation_*.bin"),
            *TINY_RUN, *flags]
    result = subprocess.run(argv, env=env, cwd=output_dir.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{output_dir}/metrics.jsonl" in result.stdout  # says where its outputs went
    return result


def test_custom_loss_and_metric_reports_top5_accuracy_at_train_and_eval(data, tmp_path):
    run_example("custom_loss_and_metric", data, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    trains = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in trains] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    assert all(0 <= r["train_top5_accuracy"] <= 1 for r in trains)
    assert all(0 <= r["eval_top5_accuracy"] <= 1 for r in evals)
    # The tiny model learns its 16-token cycle fast: top-5 accuracy rises from chance (5/64) in four steps.
    assert evals[0]["eval_top5_accuracy"] < 0.2 < evals[-1]["eval_top5_accuracy"]


def test_weighted_loader_writes_aligned_weights_and_the_loss_uses_them(data, tmp_path):
    # The stream's first id plays the end-of-text token: the stream cycles through 16 ids, so it recurs about every 16.
    eot = int(np.fromfile(data / "train_000000.bin", dtype="<u2", offset=1024)[0])
    weighted_flags = ["--eot_token", str(eot), "--context_tokens", "4", "--short_context_weight", "0"]
    result = run_example("weighted_loader", data, tmp_path / "weighted", *weighted_flags)
    assert str(tmp_path / "weighted" / "weights" / "train_*.bin") in result.stdout

    tokens = list_shards(data / "train_*.bin")[0].memmap()
    weights = list_shards(tmp_path / "weighted" / "weights" / "train_*.bin", "floats")[0].memmap()
    assert len(weights) == len(tokens)
    # Weight 0 where fewer than 4 tokens of the document are seen: the end-of-text position and the 3 after it, and
    # the stream's first 3 positions (as if an end-of-text token came before it).
    expected = np.ones(len(tokens), dtype=np.float32)
    expected[:3] = 0
    for position in np.flatnonzero(tokens == eot):
        expected[position : position + 4] = 0
    np.testing.assert_array_equal(weights, expected)

    records = read_metrics(tmp_path / "weighted")
    assert [r["step"] for r in records[:2]] == [0, 1] and "train_loss" in records[1]
    # The initial model predicts near-uniformly: every token costs about ln(64), as the step-0 eval loss (unweighted,
    # the same model) shows. The first step's loss, summed over its tokens with their weights and divided by all of
    # them, is then that cost times the mean weight (about 3/4 here); were the weights ignored, the ratio would be 1.
    first_batch = weights[: 8 * 16]
    assert 0.6 < first_batch.mean() < 0.9
    assert records[1]["train_loss"] / records[0]["eval_loss"] == pytest.approx(first_batch.mean(), abs=0.03)


def test_a_custom_callback_stops_the_run_which_then_resumes_to_the_end(data, tmp_path):
    # Any eval loss meets a target of 100: the run stops at step 0's evaluation, with a checkpoint and main/.
    result = run_example("callbacks", data, tmp_path / "run", "--target_eval_loss", "100")
    assert "eval loss target 100.0: reached at step 0" in result.stdout
    assert "timl: stopped by StopAtEvalLoss at step 0 of 4" in result.stdout
    assert (tmp_path / "run" / "step0" / "trainer_state.json").exists() and (tmp_path / "run" / "main").exists()
    # None meets a target of 0: resumed, the run goes on to its last step.
    result = run_example("callbacks", data, tmp_path / "run", "--target_eval_loss", "0",
                         "--resume_from_checkpoint", "latest")
    assert "eval loss target 0.0: not reached" in result.stdout
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]

"""What the arguments make of a run: --debug's one step and one eval batch, and nothing uploaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.arguments import TrainingArguments
from timl.recipe import ModelArguments, pretrain


def test_debug_evaluates_one_batch_and_uploads_nothing(tmp_path):
    write_learnable_shards(tmp_path, 4096, "train")
    eval_stream = write_learnable_shards(tmp_path, 640, "validation", seed=1)  # ten eval batches of 4 × 16 tokens
    run, uploads = tmp_path / "run", tmp_path / "uploads"
    args = TrainingArguments(output_dir=str(run), train_file_pattern=str(tmp_path / "train_*.bin"),
                             eval_file_pattern=str(tmp_path / "validation_*.bin"), block_size=16, train_batch_size=8,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, report_to="none",
                             optim="adamw_torch", push_to_hub=True, hub_target=str(uploads),
                             hub_model_id="someone/tiny", debug=True)
    pretrain(ModelArguments(config_overrides=TINY_GPT2), args)
    assert not uploads.exists()
    evals = [record for record in read_metrics(run) if "eval_loss" in record]
    assert [record["step"] for record in evals] == [0, 1]

    model = AutoModelForCausalLM.from_pretrained(run / "main").eval()
    tokens = torch.tensor(eval_stream.astype(np.int64))
    targets = torch.cat([tokens[1:], torch.tensor([-100])])
    with torch.no_grad():
        logits = model(input_ids=tokens.view(-1, 16)).logits.flatten(0, 1)
    first_batch = F.cross_entropy(logits[:64], targets[:64]).item()
    every_batch = F.cross_entropy(logits, targets, ignore_index=-100).item()
    assert abs(first_batch - every_batch) > 1e-4 * every_batch  # ten times the tolerance below
    assert evals[-1]["eval_loss"] == pytest.approx(first_batch, rel=1e-5)

"""Every recipe runs, under every launcher the README names, with tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_makes_its_shards_and_trains_under_accelerate_launch_with_the_cpu_config(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "recipes" / "quickstart.py"),
               "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--max_train_steps", "3",
               "--eval_every_steps", "2", "--log_every_steps", "1", "--max_eval_tokens", "2048"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "data").glob("*.bin")) == ["train_000000.bin", "validation_000000.bin"]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 3]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert "Quickstart done" in result.stdout and "best eval loss" in result.stdout
    assert "--resume_from_checkpoint latest" in result.stdout
    # main/ is a model for users: weights, config, tokenizer; no training state. It loads and generates offline.
    main = tmp_path / "run" / "main"
    assert {p.name for p in main.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                "tokenizer.json", "tokenizer_config.json"}
    script = (f"from transformers import AutoTokenizer, pipeline\n"
              f"print(AutoTokenizer.from_pretrained({str(main)!r})('Hello world')['input_ids'])\n"
              f"out = pipeline('text-generation', model={str(main)!r})('def main', max_new_tokens=4, do_sample=False)\n"
              f"print(repr(out[0]['generated_text']))\n")
    generated = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert generated.returncode == 0, generated.stderr[-3000:]
    ids, text = generated.stdout.strip().splitlines()[-2:]
    assert ids == "[15496, 995]"
    assert eval(text).startswith("def main") and len(eval(text)) > len("def main")


def test_the_custom_gpt_recipe_trains_a_self_written_model(tmp_path):
    from conftest import write_learnable_shards

    write_learnable_shards(tmp_path, 4096, "train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "recipes" / "custom_gpt.py"), "--vocab_size", "64", "--n_layer", "1",
               "--n_embd", "32", "--n_head", "2", "--max_positions", "16", "--train_file_pattern",
               str(tmp_path / "train_*.bin"), "--output_dir", str(tmp_path / "run"), "--block_size", "16",
               "--train_batch_size", "8", "--per_device_train_batch_size", "8", "--max_train_steps", "4",
               "--log_every_steps", "1", "--report_to", "none", "--optim", "muon"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "train_loss" in r] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "main" / "model.safetensors").exists()
    assert "best eval loss" not in result.stdout and "trained on 512 tokens" in result.stdout

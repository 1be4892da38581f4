"""The Trainer end to end on a GPU: bf16 autocast, the model compiled with its loss, a fused loss path, CUDA RNG
restored on resume, MFU and memory logged, no host sync between log lines; and FSDP2 through Accelerate's config, on
one process (which still shards through DTensor). Skipped without CUDA; run on the lent GPU and recorded in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import read_metrics
from timl.data.shards import list_shards, write_shard

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODELS = {
    "gpt2": ["--model_name", "gpt2", "--config_overrides", "n_layer=2,n_embd=256,n_head=4,n_positions=256"],
    "llama": ["--model_name", "llama", "--config_overrides",
              "vocab_size=50257,hidden_size=256,intermediate_size=512,num_hidden_layers=2,num_attention_heads=4,"
              "num_key_value_heads=2,head_dim=64,max_position_embeddings=256"],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    # A learnable stream: a fixed cycle of 300 GPT-2 ids, entered at random places.
    cycle = rng.permutation(50257)[:300]
    starts = rng.integers(0, 300, size=2000)
    stream = np.concatenate([np.roll(cycle, -start)[:64] for start in starts]).astype(np.uint16)
    write_shard(directory / "train_000000.bin", stream[: len(stream) * 9 // 10])
    write_shard(directory / "validation_000000.bin", stream[len(stream) * 9 // 10:][:5000])  # not whole batches
    return directory


def argv(shards: Path, output_dir: Path, model: str, *extra: str) -> list[str]:
    return [*MODELS[model], "--output_dir", str(output_dir), "--train_file_pattern", str(shards / "train_*.bin"),
            "--eval_file_pattern", str(shards / "validation_*.bin"), "--block_size", "128", "--train_batch_size", "16",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_train_steps", "40",
            "--log_every_steps", "1", "--eval_every_steps", "20", "--save_every_steps", "10", "--report_to", "none",
            "--learning_rate", "1e-3", "--warmup_steps", "5", *extra]


def launch(args: list[str], fsdp: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    config = ["--config_file", str(ROOT / "accelerate_configs" / ("fsdp.yaml" if fsdp else "single_gpu.yaml"))]
    command = [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", "1",
               str(ROOT / "recipes" / "gpt2_c4.py"), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=600)
    if os.environ.get("TIML_GPU_REPORT"):  # the launcher's log, for the record of a GPU run
        with open(Path(os.environ["TIML_GPU_REPORT"]).with_suffix(".log"), "a") as file:
            file.write(stderr[-6000:] + "\n")
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(output_dir) if "train_loss" in r}


def kill_at_step(output_dir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if (output_dir / "metrics.jsonl").exists() and max(losses(output_dir), default=0) >= step:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        assert process.poll() is None, process.communicate()[1][-4000:]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} never came")


def relative_gap(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in b)


def test_fsdp_reduces_gradients_in_fp32_and_logs_the_loss_of_ddp_not_rounded_to_bf16(shards, tmp_path):
    """FSDP2 computes in bf16 but reduces gradients in fp32 and leaves the loss in the fp32 it is computed in (the
    policy read back from the sharded model), so its logged loss follows DDP's within bf16 compute noise and is not
    rounded to bf16."""
    fsdp_log = finish(launch(argv(shards, tmp_path / "fsdp", "llama"), fsdp=True))
    finish(launch(argv(shards, tmp_path / "ddp", "llama"), fsdp=False))
    finish(launch(argv(shards, tmp_path / "ddp_again", "llama", "--seed", "1"), fsdp=False))
    assert ("FSDP2 mixed precision: parameters torch.bfloat16, gradient reduction torch.float32, outputs as "
            "computed") in fsdp_log
    fsdp, ddp, other_seed = (losses(tmp_path / name) for name in ("fsdp", "ddp", "ddp_again"))
    on_bf16_grid = [step for step, loss in fsdp.items() if torch.tensor(loss).bfloat16().item() == loss]
    gap, seed_gap = relative_gap(fsdp, ddp), relative_gap(other_seed, ddp)
    report = {"test": "fsdp_mixed_precision", "fsdp_vs_ddp": gap, "another_seed_vs_ddp": seed_gap,
              "losses_on_the_bf16_grid": len(on_bf16_grid), "steps": len(fsdp)}
    if os.environ.get("TIML_GPU_REPORT"):
        with open(os.environ["TIML_GPU_REPORT"], "a") as file:
            file.write(json.dumps(report) + "\n")
    assert len(on_bf16_grid) <= 1, report  # an fp32 loss lands on the bf16 grid by chance about 1 time in 65536
    assert gap < 0.2 * seed_gap, report  # far closer to DDP than another seed is


@pytest.mark.parametrize(("model", "fsdp", "extra"), [
    ("gpt2", False, ["--torch_compile", "true", "--loss_implementation", "chunked"]),
    ("llama", False, ["--torch_compile", "true", "--loss_implementation", "liger"]),
    ("gpt2", True, []),
    ("llama", True, ["--activation_checkpointing", "true"]),
], ids=["gpt2-compiled-chunked", "llama-compiled-liger", "gpt2-fsdp", "llama-fsdp-checkpointed"])
def test_kill_9_and_resume_continues_within_the_run_to_run_noise(shards, tmp_path, model, fsdp, extra):
    first = finish(launch(argv(shards, tmp_path / "a", model, *extra), fsdp))
    finish(launch(argv(shards, tmp_path / "b", model, *extra), fsdp))
    reference, again = losses(tmp_path / "a"), losses(tmp_path / "b")
    noise = relative_gap(again, reference)

    interrupted = launch(argv(shards, tmp_path / "c", model, *extra), fsdp)
    kill_at_step(tmp_path / "c", 24, interrupted)
    finish(launch(argv(shards, tmp_path / "c", model, *extra, "--resume_from_checkpoint", "latest"), fsdp))
    resumed = losses(tmp_path / "c")
    assert list(resumed) == list(range(1, 41))
    gap = relative_gap(resumed, reference)
    report = {"model": model, "fsdp": fsdp, "extra": extra, "noise": noise, "resume_gap": gap,
              "first_loss": reference[1], "last_loss": reference[40]}
    if os.environ.get("TIML_GPU_REPORT"):
        with open(os.environ["TIML_GPU_REPORT"], "a") as file:
            file.write(json.dumps(report) + "\n")
    assert reference[40] < 0.7 * reference[1], report  # it learns
    assert gap <= max(2 * noise, 1e-5), report

    records = read_metrics(tmp_path / "c")
    trains = [r for r in records if "train_loss" in r]
    assert all(0 < r["mfu"] < 1 and r["peak_memory_gib"] > 0 for r in trains if "mfu" in r)
    assert sum("mfu" in r for r in trains) >= 30
    assert "Kernels:" in first

    # main/ is a Hugging Face model on one device, whose eval loss is the logged one over every eval token.
    from transformers import AutoModelForCausalLM

    main = tmp_path / "c" / "main"
    assert not list(main.glob("optimizer*")) and not list(main.glob("*.distcp"))
    loaded = AutoModelForCausalLM.from_pretrained(main, torch_dtype=torch.float32).cuda().eval()
    stream = torch.from_numpy(np.asarray(list_shards(str(shards / "validation_*.bin"))[0].memmap()).astype(np.int64))
    targets = torch.cat([stream[1:], torch.tensor([-100])])
    whole = len(stream) // 128 * 128
    total = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for inputs, labels in ((stream[:whole].view(-1, 128), targets[:whole]), (stream[whole:][None], targets[whole:])):
            logits = loaded(input_ids=inputs.cuda()).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), labels.cuda(), ignore_index=-100, reduction="sum").item()
    logged = [r for r in records if "eval_loss" in r][-1]["eval_loss"]
    assert total / (len(stream) - 1) == pytest.approx(logged, rel=1e-2)  # every eval token, whole batches or not


def test_the_steps_between_log_lines_make_no_host_sync(shards, tmp_path):
    """Between log lines the loop reads nothing from the GPU, the stop votes included (each step's are read one step
    later, timl.report.window.StopVotes): a run of 24 steps makes as many synchronizing calls as one of 8."""
    import warnings

    from timl.config import TrainingArguments
    from timl.config import ModelArguments
    from timl.train.pretrain import pretrain

    def synchronizing_calls(steps: int) -> collections.Counter:
        args = TrainingArguments(output_dir=str(tmp_path / f"run{steps}"),
                                 train_file_pattern=str(shards / "train_*.bin"), block_size=128, train_batch_size=16,
                                 per_device_train_batch_size=8, max_train_steps=steps, log_every_steps=1000,
                                 eval_every_steps=0, save_every_steps=0, report_to="none")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pretrain(ModelArguments(model_name="gpt2", config_overrides=MODELS["gpt2"][3]), args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # transformers' eager mask code checks position_ids for packed sequences with a synchronizing .all() in
        # every forward (masking_utils.find_packed_sequence_indices; traced away under torch.compile): the model's,
        # not the loop's, so it is left out here.
        return collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                   if "synchronizing" in str(w.message) and "transformers" not in Path(w.filename).parts)

    short, long = synchronizing_calls(8), synchronizing_calls(24)
    assert short == long, f"synchronizing calls that grow with the steps: {long - short}"


def test_fsdp_scores_tasks_and_masks_documents_as_ddp_does(shards, tmp_path):
    """--eval_tasks and --document_masking under FSDP: every forward of the task scoring gathers the parameters,
    and the run picks FlexAttention with timl's block mask; the accuracies before training are DDP's (the same
    weights, both in bf16: within one item of the ten)."""
    from timl.data.encoders import gpt2_bpe_files
    from timl.data.saved_tokenizer import gpt2_tokenizer, save_tokenizer

    save_tokenizer(gpt2_tokenizer(*gpt2_bpe_files()), tmp_path / "tokenizer")
    extra = ["--tokenizer_name", str(tmp_path / "tokenizer"), "--document_masking", "true",
             "--eval_tasks", str(ROOT / "tasks" / "python_facts.jsonl"), "--max_train_steps", "20",
             "--save_every_steps", "0"]
    fsdp_log = finish(launch(argv(shards, tmp_path / "fsdp", "llama", *extra), fsdp=True))
    finish(launch(argv(shards, tmp_path / "ddp", "llama", *extra), fsdp=False))
    assert "attention: flex_attention with timl's document block mask" in fsdp_log
    fsdp, ddp = ({record["step"]: record for record in read_metrics(tmp_path / name)
                  if "eval_python_facts_acc" in record} for name in ("fsdp", "ddp"))
    assert sorted(fsdp) == sorted(ddp) == [0, 20]
    assert abs(fsdp[0]["eval_python_facts_acc"] - ddp[0]["eval_python_facts_acc"]) <= 0.1 + 1e-9

"""The training state in torch.distributed.checkpoint: exact round trips, FSDP2 resharding over gloo (2 → 1 → 2
processes), safe loading of planted pickles, and the export of a checkpoint as a Hugging Face model."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dcp_worker
from conftest import write_learnable_shards
from timl.checkpoint import manager as checkpoint
from timl.data.loader import ShardLoader
from timl.optim import OptimizerSet
from timl.checkpoint.state import CheckpointError, export_hf_model, load_training_state, save_training_state

ROOT = Path(__file__).resolve().parents[2]
ONE_PROCESS = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)


def train_step(model, optimizers, schedulers, step: int) -> None:
    tokens = dcp_worker.batch(step, 0, 1)
    logits = model(input_ids=tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for optimizer, scheduler in zip(optimizers, schedulers):
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def snapshot(model, optimizers, schedulers, loader) -> dict:
    tensors, schedules = dcp_worker.full_state(model, optimizers, schedulers)
    return {"tensors": tensors, "schedules": schedules, "loader": loader.state_dict(),
            "rng": (random.random(), np.random.rand(), torch.rand(3))}


def test_a_round_trip_in_one_process_restores_every_part_exactly(tmp_path):
    write_learnable_shards(tmp_path, 4096, "train")
    loader = ShardLoader(tmp_path / "train_*.bin", block_size=16, per_device_batch_size=2, rank=0, world_size=1)
    batches = iter(loader)
    model, optimizers, schedulers = dcp_worker.build(sharded=False)
    for step in range(2):
        next(batches)
        train_step(model, optimizers, schedulers, step)
    run = SimpleNamespace(output_dir=str(tmp_path / "run"), save_total_limit=None)
    data_order = {"block_size": 16, "train_batch_size": 2}
    saver = checkpoint.Checkpointer(run, ONE_PROCESS, model=model, data_order=data_order)
    optimizer_set = OptimizerSet(optimizers, schedulers, ["adamw", "sgd"])
    path = saver.save(2, optimizers=optimizer_set, loader=loader, state={})
    expected = snapshot(model, optimizers, schedulers, loader)

    fresh_model, fresh_optimizers, fresh_schedulers = dcp_worker.build(sharded=False)
    with torch.no_grad():
        for parameter in fresh_model.parameters():
            parameter.add_(1.0)  # nothing of the fresh state may survive the load
    fresh_loader = ShardLoader(tmp_path / "train_*.bin", block_size=16, per_device_batch_size=2, rank=0,
                               world_size=1)
    restorer = checkpoint.Checkpointer(run, ONE_PROCESS, model=fresh_model, data_order=data_order)
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    saved = restorer.load(path, optimizers=OptimizerSet(fresh_optimizers, fresh_schedulers, ["adamw", "sgd"]),
                         loader=fresh_loader)
    restorer.restore_rng(path)
    restored = snapshot(fresh_model, fresh_optimizers, fresh_schedulers, fresh_loader)

    assert saved["step"] == 2 and restored["loader"] == expected["loader"] and restored["loader"]["position"] == 64
    assert restored["tensors"].keys() == expected["tensors"].keys()
    assert all(torch.equal(restored["tensors"][k], v) for k, v in expected["tensors"].items())
    assert restored["schedules"] == expected["schedules"]
    assert restored["rng"][:2] == expected["rng"][:2] and torch.equal(restored["rng"][2], expected["rng"][2])
    assert fresh_optimizers[1].param_groups[0]["lr"] == optimizers[1].param_groups[0]["lr"]
    assert not any(p.suffix == ".pkl" for p in path.iterdir())


def launch(args: list[str], processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run([*launcher, str(ROOT / "tests" / "workers" / "dcp_worker.py"), *args], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_fully_sharded_checkpoints_reshard_from_2_to_1_to_2_processes(tmp_path):
    """FSDP2 over gloo on 2 processes saves; one process without a process group loads it, trains and saves; 2
    processes load that. What is loaded equals what was saved to the bit, and the losses and weights follow an
    uninterrupted one-process run (to float rounding: 2 processes sum the gradients in another order)."""
    out = str(tmp_path)
    launch(["fsdp", out, "A", "0", "2", "--save", str(tmp_path / "step2")], processes=2)
    dcp_worker.fsdp(out, "B", "2", "3", "--load", str(tmp_path / "step2"), "--save", str(tmp_path / "step3"))
    launch(["fsdp", out, "C", "3", "4", "--load", str(tmp_path / "step3"), "--save", str(tmp_path / "step4")],
           processes=2)
    dcp_worker.fsdp(out, "reference", "0", "4", "--save", str(tmp_path / "reference"))

    for saved, loaded in [("A_saved", "B_loaded"), ("B_saved", "C_loaded")]:
        before, after = load_file(tmp_path / f"{saved}.safetensors"), load_file(tmp_path / f"{loaded}.safetensors")
        assert before.keys() == after.keys() and any(k.startswith("optimizer_1.state.") for k in before)
        assert all(torch.equal(before[k], after[k]) for k in before), saved
        schedules = [json.loads((tmp_path / f"{name}_schedules.json").read_text()) for name in (saved, loaded)]
        assert schedules[0] == schedules[1]
    losses = {}
    for tag in "ABC":
        losses.update(json.loads((tmp_path / f"{tag}_losses.json").read_text()))
    reference = json.loads((tmp_path / "reference_losses.json").read_text())
    assert list(losses) == ["1", "2", "3", "4"]
    assert losses == pytest.approx(reference, rel=1e-6)
    final = load_file(tmp_path / "C_saved.safetensors")
    uninterrupted = load_file(tmp_path / "reference_saved.safetensors")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-5)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"timl_pwned_{os.getpid()}"


@pytest.fixture
def saved(tmp_path):
    model, optimizers, schedulers = dcp_worker.build(sharded=False)
    train_step(model, optimizers, schedulers, 0)
    save_training_state(tmp_path / "state", model=model, optimizers=optimizers, schedulers=schedulers)
    MARKER.unlink(missing_ok=True)
    yield tmp_path / "state", (model, optimizers, schedulers)
    assert not MARKER.exists(), "a planted pickle ran"


def load_into_fresh(directory: Path) -> None:
    model, optimizers, schedulers = dcp_worker.build(sharded=False)
    load_training_state(directory, model=model, optimizers=optimizers, schedulers=schedulers)


def test_a_planted_pickle_in_dcp_metadata_is_refused_without_running(saved):
    directory, _ = saved
    (directory / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(CheckpointError, match=r"state/\.metadata is not DCP metadata that timl can read safely.*"
                                              r"posix\.system is not part of DCP's metadata"):
        load_into_fresh(directory)
    with pytest.raises(CheckpointError, match="not DCP metadata"):
        export_hf_model(directory, directory.parent / "export")


def test_a_planted_pickle_in_the_non_tensor_state_is_refused_without_running(saved):
    """The optimizers' and schedulers' values other than tensors are JSON, and only ever read as JSON."""
    directory, _ = saved
    (directory / "non_tensor_state.json").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(CheckpointError, match=r"state/non_tensor_state\.json is not JSON, so it was not loaded"):
        load_into_fresh(directory)
    assert not MARKER.exists()


def test_dcp_entries_that_would_be_unpickled_are_refused(saved):
    """DCP stores non-tensor values with torch.save and loads them with torch.load(weights_only=False)."""
    import torch.distributed.checkpoint as dcp

    directory, (model, _, _) = saved
    dcp.save({"model": {"transformer.wte.weight": torch.zeros(1), "note": "a string"}},
             checkpoint_id=directory.parent / "bytes", no_dist=True)
    with pytest.raises(CheckpointError, match=r"lists entries that are not tensors \(model.note\)"):
        export_hf_model(directory.parent / "bytes", directory.parent / "export")


def test_a_planted_pickle_in_a_shard_is_refused_without_running(saved):
    directory, _ = saved
    (directory / "__0_0.distcp").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_into_fresh(directory)


def test_a_checkpoint_exports_as_a_model_that_from_pretrained_loads(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    directory, (model, _, _) = saved
    model.config.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text("{}")  # as a saved tokenizer would leave
    for training_state in ("rng_state_0.pt", "loader_state_0.json", "trainer_state.json"):
        (directory / training_state).write_text("{}")
    export_hf_model(directory, tmp_path / "whole")
    export_hf_model(directory, tmp_path / "sharded", max_shard_size=20_000)
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer_config.json"]
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    inputs = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        for name in ("whole", "sharded"):
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
            assert torch.equal(reloaded(input_ids=inputs).logits, expected), name

"""Checkpoints that resume exactly and never look complete when they are not.

`output_dir/step{N}/` holds:
  model.safetensors, config.json   the model, by save_pretrained: loadable with from_pretrained
  optimizer_{i}.pt, scheduler_{i}.pt  every optimizer's and schedule's state dict, read back with
                                   torch.load(weights_only=True)
  rng_state_{rank}.pt              Python, NumPy, torch and CUDA generator states of every rank
  loader_state_{rank}.json         every rank's data-loader position
  trainer_state.json               step, tokens, tracker run ids, what the data order depends on,
                                   the arguments without secrets, library versions and git commit

Every file is written into a hidden `.step{N}.tmp/` folder, fsynced, and the folder is renamed into place only when
all ranks are done: a crash or kill mid-save leaves only the hidden folder, which nothing picks up. Accelerate's
save_state/load_state would unpickle the RNG states, so timl writes these files itself.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_model

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
REQUIRED_FILES = (TRAINER_STATE, "config.json", "optimizer_0.pt", "scheduler_0.pt")
STEP_FOLDER = re.compile(r"step(\d+)")
# What the data order and the meaning of a step depend on: a checkpoint continues only the same values. (The world
# size may change: the loader's state is a stream position. The data itself is checked by the loader's state.)
DATA_ORDER_KEYS = ("block_size", "train_batch_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read, or used to continue this run."""


def copy_checkpoint(source: str | Path, destination: str | Path) -> Path:
    """Copies a finished checkpoint folder (for example step{N} to main), atomically."""
    destination = Path(destination)
    temporary = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary)
    publish(temporary, destination)
    return destination


def _fresh_temporary(directory: Path) -> Path:
    temporary = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    return temporary


def publish(temporary: Path, directory: Path) -> None:
    """fsyncs every file of `temporary`, then renames it to `directory`, replacing any old one."""
    for path in temporary.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    if directory.exists():
        # A folder cannot be renamed over a non-empty one: move the old one aside first, then drop it.
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(temporary, directory)
        shutil.rmtree(old)
    else:
        os.replace(temporary, directory)
    fd = os.open(directory.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """This process's generator states, as tensors and plain values that torch.load(weights_only=True) accepts."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_FILES) and any(directory.glob("*.safetensors"))


def step_folders(output_dir: str | Path) -> list[Path]:
    """The step{N} folders in output_dir, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and STEP_FOLDER.fullmatch(path.name)]
    return sorted(found, key=lambda path: int(STEP_FOLDER.fullmatch(path.name)[1]))


def resolve(resume_from: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: a folder, or 'latest', the newest complete step{N} in output_dir (None if
    there is none yet, so that a preempted job can be relaunched with the same command from the start)."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not is_complete(path):
            missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
            raise CheckpointError(f"--resume_from_checkpoint {path} is not a complete timl checkpoint "
                                  f"(missing: {', '.join(missing) or 'model weights'}).")
        return path
    for path in reversed(step_folders(output_dir)):
        if is_complete(path):
            return path
        logger.warning("Skipping %s: it is not a complete checkpoint.", path)
    return None


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuses to continue a checkpoint whose data order or step size differs from this run's."""
    differences = [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
                   for key in DATA_ORDER_KEYS if saved.get(key) != current.get(key)]
    if differences:
        raise CheckpointError(f"{path} cannot continue this run, since the data order or the step would change:\n  "
                              + "\n  ".join(differences) + "\nResume with the checkpoint's values, or start afresh.")


def save_weights(model: torch.nn.Module, directory: Path) -> None:
    """save_pretrained where the model has it; otherwise safetensors and the model's `config` (if any) as JSON,
    which is what a custom model needs to be reloaded with load_weights."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, safe_serialization=True)
        return
    save_model(model, str(directory / "model.safetensors"))
    config = getattr(model, "config", {})
    write_json(directory / "config.json", config if isinstance(config, dict) else vars(config))


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Loads save_pretrained's safetensors (sharded or not) into an existing model; tied weights may be absent."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    pointers = {tensor.data_ptr() for name, tensor in model.state_dict().items() if name in state}
    untied = [name for name in missing if model.state_dict()[name].data_ptr() not in pointers]
    if untied or unexpected:
        raise CheckpointError(f"{directory}: the weights do not fit the model (missing {untied}, unexpected "
                              f"{unexpected}). Resume with the same --model_name and --config_overrides.")


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class Checkpointer:
    """Saves, prunes, uploads and loads the checkpoints of one run. Every process calls save and load together."""

    def __init__(self, args: Any, accelerator: Any, uploader: Any = None):
        self.args, self.accelerator, self.uploader = args, accelerator, uploader
        self.output_dir = Path(args.output_dir)

    def save(self, step: int, *, model: Any, optimizers: Any, loader: Any, state: dict[str, Any],
             final: bool = False) -> Path:
        accelerator, rank = self.accelerator, self.accelerator.process_index
        directory = self.output_dir / f"step{step}"
        temporary = directory.with_name(f".{directory.name}.tmp")
        if accelerator.is_main_process:
            _fresh_temporary(directory)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), temporary / f"rng_state_{rank}.pt")
        write_json(temporary / f"loader_state_{rank}.json", loader.state_dict())
        if accelerator.is_main_process:
            save_weights(accelerator.unwrap_model(model), temporary)
            for index, (optimizer, scheduler) in enumerate(zip(optimizers.optimizers, optimizers.schedulers)):
                torch.save(optimizer.state_dict(), temporary / f"optimizer_{index}.pt")
                torch.save(scheduler.state_dict(), temporary / f"scheduler_{index}.pt")
            write_json(temporary / TRAINER_STATE, {**state, "step": step, "world_size": accelerator.num_processes,
                                                   "optimizers": optimizers.names})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish(temporary, directory)
            self._upload(directory, f"step{step}")
            if final:
                self._upload(copy_checkpoint(directory, self.output_dir / "main"), "main", final=True)
            self.prune(keep=directory)
        accelerator.wait_for_everyone()
        return directory

    def _upload(self, directory: Path, revision: str, final: bool = False) -> None:
        if self.uploader is not None:
            self.uploader.submit(directory, revision, final=final)

    def prune(self, keep: Path) -> None:
        """Deletes all but the newest --save_total_limit step folders, never one still uploading."""
        limit = getattr(self.args, "save_total_limit", None)
        if not limit:
            return
        pending = set(self.uploader.pending()) if self.uploader is not None else set()
        for path in step_folders(self.output_dir)[:-limit]:
            if path == keep or path.resolve() in {p.resolve() for p in pending}:
                continue
            # Renamed first, so that a crash mid-delete leaves a hidden folder, not a step folder missing files.
            doomed = path.with_name(f".{path.name}.deleting")
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            logger.info("Deleted %s (--save_total_limit %d).", path, limit)

    def load(self, path: Path, *, model: Any, optimizers: Any, loader: Any) -> dict[str, Any]:
        """Restores everything but the RNG (see restore_rng); returns the saved trainer state."""
        state = read_json(path / TRAINER_STATE)
        check_compatible(state.get("data_order", {}), {k: getattr(self.args, k) for k in DATA_ORDER_KEYS}, path)
        load_weights(self.accelerator.unwrap_model(model), path)
        if state.get("optimizers") != optimizers.names:
            raise CheckpointError(f"{path} holds the state of optimizers {state.get('optimizers')}, but this run has "
                                  f"{optimizers.names}; resume with the same --optim.")
        for index, (optimizer, scheduler) in enumerate(zip(optimizers.optimizers, optimizers.schedulers)):
            # Read onto the CPU: load_state_dict moves each state to its parameter's device.
            optimizer.load_state_dict(torch.load(path / f"optimizer_{index}.pt", map_location="cpu", weights_only=True))
            scheduler.load_state_dict(torch.load(path / f"scheduler_{index}.pt", weights_only=True))
        loader.load_state_dict(self._loader_state(path, state["world_size"]))
        return state

    def _loader_state(self, path: Path, saved_world_size: int) -> dict[str, Any]:
        rank, world_size = self.accelerator.process_index, self.accelerator.num_processes
        if saved_world_size == world_size:
            return read_json(path / f"loader_state_{rank}.json")
        states = [read_json(path / f"loader_state_{r}.json") for r in range(saved_world_size)]
        if any(s != states[0] for s in states):
            raise CheckpointError(f"{path} was saved by {saved_world_size} processes whose loaders stood at different "
                                  f"places; resume it with {saved_world_size} processes, not {world_size}.")
        return states[0]

    def restore_rng(self, path: Path) -> None:
        """Restores this rank's generators; call it last, after everything that draws random numbers at start-up."""
        file = path / f"rng_state_{self.accelerator.process_index}.pt"
        if file.exists():
            set_rng_state(torch.load(file, weights_only=True))
        else:
            logger.warning("%s has no RNG state for rank %d (saved with another world size); random streams such as "
                           "dropout will differ from an uninterrupted run.", path, self.accelerator.process_index)

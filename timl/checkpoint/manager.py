"""Checkpoints that resume exactly, on any number of processes, and never look complete when they are not.

`output_dir/step{N}/` holds:
  .metadata, __{rank}_0.distcp     the model, optimizer and scheduler tensors in torch.distributed.checkpoint
                                   (DCP): one file per rank, each rank writing its own shard (see timl.checkpoint.state)
  non_tensor_state.json            the optimizers' and schedulers' other values (hyperparameters, group names)
  rng_state_{rank}.pt              every rank's Python, NumPy, torch and CUDA generator states
  loader_state_{rank}.json         every rank's data-loader position
  config.json, tokenizer files     the model's config (and generation_config.json) and the run's tokenizer, if
                                   any: what export_hf_model copies beside the weights
  manifest.json                    every other file's size and xxh3 checksum (see verify)
  trainer_state.json               step, tokens, tracker run ids, what the data order depends on, the arguments
                                   without secrets, library versions and git commit, the run's state (best eval,
                                   time, latest values), the callbacks' states, whether the step's evaluation is
                                   still to do; written last, it marks the folder complete
`output_dir/main/` is the last checkpoint's model alone, as a Hugging Face folder (model.safetensors, config.json):
`from_pretrained` loads it on one device.

Every file is written into a hidden `.step{N}.tmp/` folder and fsynced, and rank 0 renames the folder into place once
all ranks are done: a crash or kill mid-save leaves only the hidden folder, which nothing picks up. A save that fails
on any rank (a full disk, permissions, a quota) raises CheckpointSaveError on every rank and removes the hidden folder.
Resuming verifies the manifest first, so that a truncated or altered file is named instead of failing deep in torch.
Nothing is unpickled on loading but DCP's metadata, through an unpickler that admits its own classes alone.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

from timl.checkpoint.durable import (atomic_directory, publish_directory, remove_directory, synced_file,
                                     temporary_directory, temporary_path)
from timl.checkpoint.state import (REQUIRED_FILES, TRAINER_STATE, CheckpointError, export_hf_model, file_entry,
                                   load_training_state, naming_file, os_error_of, read_json, save_training_state,
                                   verify, write_json, write_manifest, write_model_config)
from timl.collectives import all_ranks, from_rank_0, rank_and_world_size

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "CheckpointSaveError", "Checkpointer", "check_free_space", "check_shared_output_dir",
           "checkpoint_bytes_estimate", "export_hf_model", "is_complete", "load_weights", "read_trainer_state",
           "resolve", "set_aside_steps_after", "step_folders", "verify"]

STEP_FOLDER = re.compile(r"step(\d+)")
# What the data order and the meaning of a step depend on: a checkpoint continues only the same values. (The world
# size may change: the loader's state is a stream position. The data itself is checked by the loader's state.)
DATA_ORDER_KEYS = ("block_size", "train_batch_size")


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


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, permissions, a quota); raised on every rank at once."""


def is_complete(directory: Path) -> bool:
    return all((Path(directory) / name).is_file() for name in REQUIRED_FILES)


def step_folders(output_dir: str | Path) -> list[Path]:
    """The step{N} folders in output_dir, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and STEP_FOLDER.fullmatch(path.name)]
    return sorted(found, key=lambda path: int(STEP_FOLDER.fullmatch(path.name)[1]))


def resolve(resume_from: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, verified (see verify): the folder named, or for 'latest' the newest step{N} in
    output_dir that verifies; None if output_dir has no step folder yet, so that a preempted job can be relaunched
    with the same command from the start. Newer folders that fail are named in a warning and left in place; if none
    verifies, CheckpointError. With a process group, every rank calls it and gets the same answer."""
    if resume_from != "latest":
        path = Path(resume_from)
        problems = verify(path)
        if problems:
            older = " (it looks like a checkpoint of timl before DCP)" if (path / "optimizer_0.pt").exists() else ""
            raise CheckpointError(f"--resume_from_checkpoint {path} is not a complete timl checkpoint{older}: "
                                  f"{'; '.join(problems)}.")
        return path
    rejected = []
    for path in reversed(from_rank_0(lambda: step_folders(output_dir))):
        problems = verify(path)
        if not problems:
            return path
        if rank_and_world_size()[0] == 0:
            logger.warning("Skipping %s, which stays in place: %s.", path, "; ".join(problems))
        rejected.append(f"{path}: {'; '.join(problems)}")
    if rejected:
        raise CheckpointError(f"No checkpoint in {output_dir} verifies, so the run cannot resume:\n  "
                              + "\n  ".join(rejected) + "\nRestore one from a copy (a --push_to_hub upload), or move "
                              "them out of output_dir to start from the beginning.")
    return None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: its step, tokens, arguments, run state and the rest."""
    return read_json(Path(path) / TRAINER_STATE)


def set_aside_steps_after(output_dir: str | Path, step: int) -> list[Path]:
    """Renames the step folders after `step` to hidden `.step{N}.abandoned-<time>` folders, and returns them.

    A run resumed from an older checkpoint abandons the newer ones: they hold another history than the one it now
    writes, so neither --resume_from_checkpoint latest nor --save_total_limit may see them. Nothing is deleted."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for path in step_folders(output_dir):
        if int(STEP_FOLDER.fullmatch(path.name)[1]) > step:
            target = path.with_name(f".{path.name}.abandoned-{stamp}")
            os.replace(path, target)
            moved.append(target)
    if moved:
        logger.warning("Resumed from step %d, so the later checkpoints of the run it rolls back are set aside: %s.",
                       step, ", ".join(str(path) for path in moved))
    return moved


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuses to continue a checkpoint whose data order or step size differs from this run's."""
    differences = [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
                   for key in DATA_ORDER_KEYS if saved.get(key) != current.get(key)]
    if differences:
        raise CheckpointError(f"{path} cannot continue this run, since the data order or the step would change:\n  "
                              + "\n  ".join(differences) + "\nResume with the checkpoint's values, or start afresh.")


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Loads a Hugging Face folder's safetensors (sharded or not; main/, an export) into an existing model; tied
    weights may be absent."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    pointers = {tensor.data_ptr() for name, tensor in model.state_dict().items() if name in state}
    untied = [name for name in missing if model.state_dict()[name].data_ptr() not in pointers]
    if untied or unexpected:
        raise CheckpointError(f"{directory}: the weights do not fit the model (missing {untied}, unexpected "
                              f"{unexpected}). Use the same model and config as the run that saved them.")


def check_shared_output_dir(output_dir: str | Path, *, local_rank: int, device: torch.device | str = "cpu") -> None:
    """Checks that every node sees the same output_dir: each rank writes its shard of a checkpoint there and rank 0
    publishes the folder, so on several nodes it must be a shared filesystem. Rank 0 writes a random token, and each
    node's local rank 0 reads it back; all ranks raise if any node cannot. Every rank calls it (a no-op alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    output_dir, rank = Path(output_dir), dist.get_rank()
    # The nonce comes from the OS, not from the generators that a resumed run restores.
    nonce = torch.tensor([secrets.randbits(62) if rank == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(nonce, src=0)
    token = output_dir / f".timl_shared_{nonce.item()}"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(token, nonce.item())
    dist.barrier()
    seen = True
    if local_rank == 0:
        try:
            seen = read_json(token) == nonce.item()
        except (OSError, ValueError):
            seen = False
    blind = torch.tensor([0 if seen else 1], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(blind) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, blind)
    dist.barrier()
    if rank == 0:
        token.unlink()
    missing = [index for index, flag in enumerate(everyone) if flag.item()]
    if missing:
        raise CheckpointError(
            f"--output_dir {output_dir} is not shared between the nodes: rank 0 wrote a file there that the node(s) "
            f"of rank(s) {missing} cannot read (this is rank {rank}, on {socket.gethostname()}). Every rank writes "
            f"its shard of a checkpoint into output_dir and rank 0 publishes it, so output_dir must be on a "
            f"filesystem that all nodes mount at the same path (NFS, Lustre, GPFS, a mounted bucket).")


def _free_bytes(path: Path) -> int:
    """The free space of the filesystem that holds `path`, or would hold it once made."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _readable(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "bytes" else f"{int(count)} bytes"
        count /= 1024
    return f"{count:.1f} TiB"


def _failure_lines(error: BaseException, rank: int) -> list[str]:
    """What failed, one line per rank that failed: the file and the OS's reason, when there is one."""
    if isinstance(error, CheckpointException):  # DCP raises it on every rank, holding the failed ranks' errors
        return [line for failed, (cause, _) in sorted(error.failures.items())
                for line in _failure_lines(cause, failed)]
    cause = os_error_of(error)
    if cause is None:
        return [f"rank {rank}: {type(error).__name__}: {error}"]
    reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno else str(cause)
    return [f"rank {rank} could not write {cause.filename or 'its files'}: {reason}"]


def _save_error(directory: Path, failures: list[str]) -> CheckpointSaveError:
    output_dir = directory.parent
    complete = [path for path in step_folders(output_dir) if is_complete(path)]
    if complete:
        advice = (f"The last complete checkpoint is {complete[-1]}: once there is room (or the cause is fixed), "
                  f"continue from it with --resume_from_checkpoint latest.")
    else:
        advice = f"There is no complete checkpoint in {output_dir}: once there is room, the run starts again."
    return CheckpointSaveError(f"Could not save the checkpoint {directory}:\n  " + "\n  ".join(failures)
                               + f"\n{output_dir} has {_readable(_free_bytes(output_dir))} free. The unfinished "
                               f"checkpoint is removed and the earlier ones are intact. {advice}")


def checkpoint_bytes_estimate(model: torch.nn.Module, output_dir: str | Path, states_per_parameter: int = 2) -> int:
    """About how many bytes a checkpoint takes: the newest complete one in output_dir, if any; else the parameters
    and `states_per_parameter` more tensors of their size (AdamW keeps two moments, Muon one momentum)."""
    complete = [path for path in step_folders(output_dir) if is_complete(path)]
    if complete:
        return sum(path.stat().st_size for path in complete[-1].iterdir() if path.is_file())
    parameters = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return parameters * (1 + states_per_parameter)


def check_free_space(output_dir: str | Path, estimate: int) -> bool:
    """Warns when output_dir has room for fewer than two checkpoints of `estimate` bytes: a save writes the new one
    before --save_total_limit deletes an old one. Returns whether there is room."""
    free = _free_bytes(Path(output_dir))
    if free >= 2 * estimate:
        return True
    logger.warning("%s has %s free, less than two checkpoints of about %s each: a save may fail with a full disk "
                   "(the run then stops, and the last complete checkpoint stays). Free some space, or use another "
                   "--output_dir.", output_dir, _readable(free), _readable(estimate))
    return False


class Checkpointer:
    """Saves, prunes, uploads and loads the checkpoints of one run. Every process calls save and load together.

    `args` is the checkpoint group of the arguments (output_dir, save_total_limit). `model` is the module as trained
    (DDP-wrapped, fully_shard-ed or plain); `base_model` is the model inside it (the Hugging Face one), whose names
    and config the checkpoint keeps; `tokenizer`, if given, is saved beside them. `data_order` holds this run's
    values of DATA_ORDER_KEYS, which a checkpoint must share to be resumed.
    """

    def __init__(self, args: Any, accelerator: Any, start_uploader: Callable[[], Any] | None = None, *,
                 model: torch.nn.Module, base_model: torch.nn.Module | None = None, tokenizer: Any = None,
                 data_order: dict[str, Any] | None = None):
        self.args, self.accelerator, self.tokenizer = args, accelerator, tokenizer
        self.data_order = dict(data_order or {})
        self.model, self.base_model = model, base_model if base_model is not None else model
        self.output_dir = Path(args.output_dir)
        self.start_uploader, self.uploader = start_uploader, None

    def open_uploads(self) -> None:
        """Starts the upload process (on the main process, if there is an uploader to start): when a session begins
        to train, so that resuming a finished run uploads nothing."""
        if self.start_uploader is not None and self.accelerator.is_main_process:
            self.uploader = self.start_uploader()

    def close_uploads(self, timeout: float | None) -> None:
        """Waits for the pending uploads (at most `timeout` s; the failures are logged) and ends the process."""
        if self.uploader is not None:
            uploader, self.uploader = self.uploader, None
            uploader.close(timeout=timeout)

    def save(self, step: int, *, optimizers: Any, loader: Any, state: dict[str, Any], final: bool = False) -> Path:
        """Writes step{step}/ (and main/ when `final`). A failure on any rank raises CheckpointSaveError on every rank
        and leaves no unfinished folder behind."""
        directory = self.output_dir / f"step{step}"
        temporary = temporary_path(directory, per_process=False)
        trainer_state = {**state, "data_order": self.data_order, "step": step,
                         "world_size": self.accelerator.num_processes,
                         "optimizers": optimizers.names}
        try:
            self._on_every_rank(directory, lambda: temporary_directory(directory, per_process=False),
                                main_only=True)
            written = self._on_every_rank(directory, lambda: self._write_rank_files(temporary, optimizers, loader))
            hashed = {name: entry for entries in written for name, entry in entries.items()}
            self._on_every_rank(directory, lambda: self._complete(directory, hashed, trainer_state, final),
                                main_only=True)
        except CheckpointSaveError:
            if self.accelerator.is_main_process:
                shutil.rmtree(temporary, ignore_errors=True)
            raise
        return directory

    def _on_every_rank(self, directory: Path, work: Callable[[], Any], main_only: bool = False) -> list[Any]:
        """Runs `work` (on the main process alone if main_only) and returns every rank's result. A failure on any
        rank raises CheckpointSaveError on all: the ranks exchange their outcomes instead of meeting at a barrier,
        which a rank that failed would never reach."""
        result, error = None, None
        if self.accelerator.is_main_process or not main_only:
            try:
                result = work()
            except (Exception, CheckpointException) as caught:  # CheckpointException is a BaseException
                error = caught
        failed = _failure_lines(error, self.accelerator.process_index) if error is not None else []
        outcomes = all_ranks((result, failed))
        failures = list(dict.fromkeys(line for _, lines in outcomes for line in lines))
        if failures:
            raise _save_error(directory, failures) from error
        return [result for result, _ in outcomes]

    def _write_rank_files(self, temporary: Path, optimizers: Any, loader: Any) -> dict[str, dict[str, Any]]:
        """Writes this rank's share of a checkpoint; returns the manifest entries of the files that only it wrote."""
        rank = self.accelerator.process_index
        save_training_state(temporary, model=self.model, optimizers=optimizers.optimizers,
                            schedulers=optimizers.schedulers, base_model=self.base_model)
        rng_file, loader_file = temporary / f"rng_state_{rank}.pt", temporary / f"loader_state_{rank}.json"
        with naming_file(rng_file), synced_file(rng_file) as file:
            torch.save(rng_state(), file)
        write_json(loader_file, loader.state_dict())
        own = [*temporary.glob(f"__{rank}_*.distcp"), rng_file, loader_file]
        return {path.name: file_entry(path) for path in own}

    def _complete(self, directory: Path, hashed: dict[str, dict[str, Any]], trainer_state: dict[str, Any],
                  final: bool) -> None:
        """On the main process: the shared files, the manifest, the marker; then publishes, exports, uploads, prunes."""
        temporary = temporary_path(directory, per_process=False)
        write_model_config(self.base_model, temporary)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(temporary)
        write_manifest(temporary, hashed)
        write_json(temporary / TRAINER_STATE, trainer_state)
        publish_directory(temporary, directory)
        self._upload(directory, directory.name)
        if final:
            self._upload(self.export(directory, self.output_dir / "main"), "main", final=True)
        self.prune(keep=directory)

    @staticmethod
    def export(checkpoint_dir: Path, destination: Path) -> Path:
        """Exports a checkpoint's model to `destination` as a Hugging Face folder, atomically."""
        with atomic_directory(destination) as temporary:
            export_hf_model(checkpoint_dir, temporary)
        return destination

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
            remove_directory(path)
            logger.info("Deleted %s (--save_total_limit %d).", path, limit)

    def load(self, path: Path, *, optimizers: Any, loader: Any) -> dict[str, Any]:
        """Restores everything but the RNG (see restore_rng), resharded onto this run's processes; returns the saved
        trainer state."""
        state = read_trainer_state(path)
        check_compatible(state.get("data_order", {}), self.data_order, path)
        if state.get("optimizers") != optimizers.names:
            raise CheckpointError(f"{path} holds the state of optimizers {state.get('optimizers')}, but this run has "
                                  f"{optimizers.names}; resume with the same --optim.")
        load_training_state(path, model=self.model, optimizers=optimizers.optimizers,
                            schedulers=optimizers.schedulers, base_model=self.base_model)
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

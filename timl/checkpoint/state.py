"""The training state in torch.distributed.checkpoint (DCP): every rank writes its own shard and any number of ranks
reads it back, so a checkpoint saved by N processes (DDP or FSDP2) resumes on M, and nothing is gathered on one GPU.

DCP holds tensors only: the model's under the base model's own names (`model.<name>`, the names `from_pretrained`
expects), and the optimizers' and schedulers' (`optimizer_{i}.<path>`, `scheduler_{i}.<path>`). The rest of their
state dicts (hyperparameters, the parameter names of each group) goes to `non_tensor_state.json`. DCP would store
such values with torch.save and read them back with torch.load(weights_only=False); as timl never writes them, a
checkpoint that has them is refused, and DCP's own `.metadata` pickle is read by an unpickler that admits DCP's
metadata classes alone. Tensors DCP reads with torch.load(weights_only=True).

Every file of a step folder is listed in its `manifest.json` with its size and checksum (below), so that a
truncated or altered file is named at resume instead of failing deep in torch. `export_hf_model` turns a checkpoint's
model into a folder that `from_pretrained` loads, on the CPU and without a process group.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from timl.checkpoint import durable
from timl.collectives import all_ranks, from_rank_0, is_distributed, rank_and_world_size
from timl.errors import RunError

logger = logging.getLogger(__name__)

METADATA = ".metadata"
NON_TENSOR_STATE = "non_tensor_state.json"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
MODEL = "model"
# What a checkpoint folder holds only to resume training; export_hf_model copies every other file (config,
# generation config, tokenizer files) beside the weights.
TRAINING_STATE_FILES = re.compile(r"\.metadata|.*\.distcp|non_tensor_state\.json|trainer_state\.json|manifest\.json|"
                                  r"rng_state_\d+\.pt|loader_state_\d+\.json")
_TENSOR, _TUPLE = "__tensor__", "__tuple__"


class CheckpointError(RunError):
    """A checkpoint that cannot be found, read, or used to continue this run."""


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, one it was raised from or while handling, or one that a Rust library
    (safetensors) names only in its message, as 'os error 28'."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    found = re.search(r"os error (\d+)", str(error))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


@contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Re-raises an OSError met while writing `path` as a plain OSError that names the file: a write() onto a full
    disk says only 'No space left on device', and torch.save turns even that into 'unexpected pos'."""
    try:
        yield
    except Exception as error:
        cause = os_error_of(error)
        if cause is None or (cause is error and cause.filename):
            raise
        raise OSError(cause.errno, cause.strerror, cause.filename or str(path)) from error


def write_json(path: Path, value: Any) -> None:
    """Writes JSON in place and fsyncs it (see timl.checkpoint.durable.synced_file): for a file of a checkpoint folder, which is
    published whole. Errors name the file."""
    with naming_file(path):
        durable.write_json(path, value, open_file=durable.synced_file)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def split_tensors(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Separates a state dict's tensors, keyed by their dotted path, from the rest, which becomes JSON with
    {"__tensor__": path} in each tensor's place. Anything but tensors, numbers, strings, lists and dicts is refused:
    it could only be pickled."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        child = (lambda key: f"{path}.{key}") if path else str
        if isinstance(value, torch.Tensor):
            if path in tensors:
                raise CheckpointError(f"Two tensors of a state dict would be saved as {path!r}.")
            tensors[path] = value
            return {_TENSOR: path}
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise CheckpointError(f"{path or 'A state dict'} has keys that are not strings: {list(value)[:5]}.")
            return {key: walk(item, child(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [walk(item, child(index)) for index, item in enumerate(value)]
            return {_TUPLE: items} if isinstance(value, tuple) else items
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"{path}: a {type(value).__name__} cannot be checkpointed without pickling it; a state "
                              f"dict may hold tensors, numbers, strings, lists and dicts.")

    return walk(tree, ""), tensors


def merge_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of split_tensors."""
    if isinstance(skeleton, dict):
        if skeleton.keys() == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if skeleton.keys() == {_TUPLE}:
            return tuple(merge_tensors(item, tensors) for item in skeleton[_TUPLE])
        return {key: merge_tensors(item, tensors) for key, item in skeleton.items()}
    if isinstance(skeleton, list):
        return [merge_tensors(item, tensors) for item in skeleton]
    return skeleton


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP and torch.compile, whose names get_state_dict uses."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _key_prefix(model: torch.nn.Module, base_model: torch.nn.Module | None) -> str:
    """Where base_model sits in model ('model.' inside timl's CausalLMForTraining): its keys are saved without it."""
    root = _unwrap(model)
    if base_model is None or base_model is root:
        return ""
    for name, module in root.named_modules():
        if module is base_model:
            return f"{name}."
    raise ValueError("base_model is not a submodule of model.")


def _renamed(optimizer_state: dict[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    """An optimizer state dict from get_optimizer_state_dict, with every parameter name passed through rename."""
    return {"state": {rename(name): value for name, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [rename(name) for name in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


class _ModelState(Stateful):
    """The model's tensors for DCP, named as in the base model. DDP, FSDP2 and plain modules alike."""

    def __init__(self, model: torch.nn.Module, prefix: str):
        self.model, self.prefix = model, prefix

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = get_model_state_dict(self.model)
        outside = [key for key in state if not key.startswith(self.prefix)]
        if outside:
            raise CheckpointError(f"The training module holds state outside the model: {outside[:5]}.")
        return {key[len(self.prefix):]: value for key, value in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, {self.prefix + key: value for key, value in state.items()})


class _SplitState(Stateful):
    """An optimizer's or scheduler's state: its tensors go to DCP, the rest to JSON. `rest` is what state_dict left
    out; `saved` is the rest read back from a checkpoint, which load_state_dict joins to the loaded tensors."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], Any], saved: Any = None):
        self.get, self.set, self.saved, self.rest = get, set, saved, None

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.rest, tensors = split_tensors(self.get())
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.set(merge_tensors(self.saved, tensors))


def _states(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any],
            base_model: torch.nn.Module | None, saved: dict[str, Any] | None = None) -> dict[str, Stateful]:
    prefix = _key_prefix(model, base_model)
    saved = saved or {}
    states: dict[str, Stateful] = {MODEL: _ModelState(model, prefix)}
    for index, optimizer in enumerate(optimizers):
        def get(optimizer=optimizer):
            return _renamed(get_optimizer_state_dict(model, optimizer), lambda name: name[len(prefix):])

        def set(state, optimizer=optimizer):
            set_optimizer_state_dict(model, optimizer, _renamed(state, lambda name: prefix + name))

        states[f"optimizer_{index}"] = _SplitState(get, set, saved.get(f"optimizer_{index}"))
    for index, scheduler in enumerate(schedulers):
        states[f"scheduler_{index}"] = _SplitState(scheduler.state_dict, scheduler.load_state_dict,
                                                   saved.get(f"scheduler_{index}"))
    return states


class _NamingFileSystem(FileSystem):
    """DCP's local file system, whose write errors name the file (see naming_file)."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        with naming_file(path), super().create_stream(path, mode) as stream:
            yield stream


def _quiet_if_single(call: Callable[..., Any], *args: Any, no_dist: bool, **kwargs: Any) -> Any:
    """Calls dcp.save or dcp.load; one process on purpose needs no warning that there is no process group."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return call(*args, no_dist=no_dist, **kwargs)


def save_training_state(directory: str | Path, *, model: torch.nn.Module,
                        optimizers: Sequence[torch.optim.Optimizer] = (), schedulers: Sequence[Any] = (),
                        base_model: torch.nn.Module | None = None) -> None:
    """Writes this rank's shard of the model, optimizer and scheduler state into `directory`; every rank of the
    default process group calls it (with none, one process writes everything). `model` is the module as trained
    (DDP-wrapped, fully_shard-ed or plain); its keys are saved relative to `base_model`, a submodule, if given."""
    directory = Path(directory)
    states = _states(model, optimizers, schedulers, base_model)
    writer = FileSystemWriter(directory)
    writer.fs = _NamingFileSystem()
    _quiet_if_single(dcp.save, states, storage_writer=writer, no_dist=not is_distributed())
    if not is_distributed() or dist.get_rank() == 0:
        write_json(directory / NON_TENSOR_STATE,
                   {key: state.rest for key, state in states.items() if isinstance(state, _SplitState)})


def load_training_state(directory: str | Path, *, model: torch.nn.Module,
                        optimizers: Sequence[torch.optim.Optimizer] = (), schedulers: Sequence[Any] = (),
                        base_model: torch.nn.Module | None = None) -> None:
    """Restores what save_training_state wrote, resharded onto however many ranks call it now."""
    directory = Path(directory)
    read_metadata(directory)  # refuses anything but DCP's own metadata before DCP unpickles it
    try:
        saved = read_json(directory / NON_TENSOR_STATE)
    except ValueError as error:  # not UTF-8, or not JSON
        raise CheckpointError(f"{directory / NON_TENSOR_STATE} is not JSON, so it was not loaded: {error}") from error
    states = _states(model, optimizers, schedulers, base_model, saved)
    if saved.keys() != states.keys() - {MODEL}:
        raise CheckpointError(f"{directory} holds the state of {sorted(saved)}, but this run has "
                              f"{sorted(states.keys() - {MODEL})}.")
    try:
        _quiet_if_single(dcp.load, states, storage_reader=FileSystemReader(directory), no_dist=not is_distributed())
    except (CheckpointException, Exception) as error:  # CheckpointException is a BaseException
        raise CheckpointError(f"{directory} could not be loaded into this model and its optimizers (the same "
                              f"--model_name, --config_overrides and --optim?): {error}") from error


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch dtypes, layouts and sizes, and paths: nothing that runs code."""

    OTHERS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
              ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}
    PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata":
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in self.OTHERS or (module.split(".")[0] == "pathlib" and name in self.PATHS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def read_metadata(directory: str | Path) -> Metadata:
    """A checkpoint's DCP metadata, read without running any code it might carry, and checked to list tensors only."""
    path = Path(directory) / METADATA
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except OSError:
        raise
    except Exception as error:
        raise CheckpointError(f"{path} is not DCP metadata that timl can read safely, so it was not loaded: "
                              f"{error}") from error
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata, so it was not loaded.")
    pickled = [key for key, entry in metadata.state_dict_metadata.items()
               if not isinstance(entry, TensorStorageMetadata)]
    if pickled:
        raise CheckpointError(f"{path} lists entries that are not tensors ({', '.join(pickled[:5])}), which DCP "
                              f"would unpickle; timl never writes them, so it refuses to load this checkpoint.")
    return metadata


def write_model_config(model: torch.nn.Module, directory: Path) -> None:
    """What from_pretrained needs besides the weights: config.json (and generation_config.json) as save_pretrained
    writes them; for a custom model, its `config` (a dict or an object), if it has one."""
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(directory)
        generation_config = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if generation_config is not None and callable(can_generate) and can_generate():
            generation_config.save_pretrained(directory)
    elif config is not None:
        write_json(directory / "config.json", config if isinstance(config, dict) else vars(config))


def export_hf_model(checkpoint_dir: str | Path, out_dir: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Writes a checkpoint's model into `out_dir` as a Hugging Face model folder: safetensors (sharded beyond
    max_shard_size, with an index) and the checkpoint's other files that are not training state (the config,
    generation config and tokenizer files); no optimizer, scheduler, RNG or loader state. Reads on the CPU without a
    process group, so one process calls it."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    prefix = f"{MODEL}."
    weights = {key[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in read_metadata(checkpoint_dir).state_dict_metadata.items() if key.startswith(prefix)}
    _quiet_if_single(dcp.load, {MODEL: weights}, storage_reader=FileSystemReader(checkpoint_dir), no_dist=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(weights, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: weights[name].contiguous() for name in names}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
        write_json(out_dir / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename})
    for path in checkpoint_dir.iterdir():
        if path.is_file() and not TRAINING_STATE_FILES.fullmatch(path.name):
            shutil.copy2(path, out_dir / path.name)
    return out_dir


# The manifest. Each checkpoint's manifest: every file's size and checksum, recorded at the save and verified before a resume, so
# that a truncated or altered file is named instead of failing deep in torch.
# 
# `manifest.json` covers every file of a step folder but trainer_state.json, which is written after it (its presence
# marks the folder complete) and is checked by parsing it. Each rank hashes the files it wrote; verifying deals the
# files out among the ranks, so that it costs about one read of the checkpoint in all.

REQUIRED_FILES = (METADATA, NON_TENSOR_STATE, TRAINER_STATE)
# xxh3 hashes faster than a disk or the page cache can deliver, so verifying costs one read of the checkpoint. It
# guards against truncation and corruption, not tampering: loading never runs pickled code anyway.
CHECKSUM = "xxh3_64"


def file_entry(path: Path) -> dict[str, Any]:
    """A file's size and checksum, as the manifest records them."""
    hasher, size = xxhash.xxh3_64(), 0
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            hasher.update(view[:count])
            size += count
    return {"bytes": size, CHECKSUM: hasher.hexdigest()}


def write_manifest(directory: Path, hashed: dict[str, dict[str, Any]]) -> None:
    """Records the size and checksum of every file in `directory` but trainer_state.json, which is written after it
    and checked by parsing it. `hashed` holds the entries already made (by the ranks that wrote those files)."""
    files = dict(hashed)
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in files and path.name not in (TRAINER_STATE, MANIFEST):
            files[path.name] = file_entry(path)
    write_json(directory / MANIFEST, {"checksum": CHECKSUM, "files": dict(sorted(files.items()))})


def _manifest_files(directory: Path) -> tuple[list[str], dict[str, dict[str, Any]] | None]:
    """The quick part of verifying a checkpoint: what is wrong so far, and the files its manifest lists (None when
    there is nothing more to check)."""
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        return [f"missing {', '.join(missing)}"], None
    try:
        state = read_json(directory / TRAINER_STATE)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("it holds no step")
    except (OSError, ValueError) as error:
        return [f"{TRAINER_STATE} is not a trainer state ({error})"], None
    if not (directory / MANIFEST).is_file():
        logger.warning("%s has no %s (timl saved it before it wrote manifests): its files cannot be verified.",
                       directory, MANIFEST)
        return [], None
    try:
        manifest = read_json(directory / MANIFEST)
        if manifest["checksum"] != CHECKSUM:
            return [f"{MANIFEST} uses the checksum {manifest['checksum']!r}, which this timl cannot check"], None
        return [], {name: {"bytes": int(entry["bytes"]), CHECKSUM: str(entry[CHECKSUM])}
                    for name, entry in manifest["files"].items()}
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as error:
        return [f"{MANIFEST} is not a manifest ({type(error).__name__}: {error})"], None


def _file_problem(directory: Path, name: str, expected: dict[str, Any]) -> str | None:
    try:
        size = (directory / name).stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size} bytes instead of {expected['bytes']} (truncated or overwritten)"
        actual = file_entry(directory / name)[CHECKSUM]
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as error:
        return f"{name} cannot be read ({error.strerror})"
    if actual != expected[CHECKSUM]:
        return f"{name} fails its checksum: {CHECKSUM} {actual}, not {expected[CHECKSUM]} (its contents changed)"
    return None


def verify(directory: str | Path) -> list[str]:
    """What is wrong with a checkpoint: missing files, sizes or checksums that differ from its manifest, a
    trainer_state.json that does not parse; [] when nothing is. A checkpoint saved before manifests is only checked
    for its files, with a warning. With a process group, every rank calls it: each reads its share of the files, and
    all get the whole answer."""
    directory = Path(directory)
    problems, files = from_rank_0(lambda: _manifest_files(directory))
    if files is None:
        return problems
    rank, world_size = rank_and_world_size()
    # Dealt out largest first, so that every rank reads about as much: each holds one shard of a similar size.
    share = sorted(files, key=lambda name: (-files[name]["bytes"], name))[rank::world_size]
    found = [problem for name in share if (problem := _file_problem(directory, name, files[name]))]
    return sorted(problem for problems in all_ranks(found) for problem in problems)

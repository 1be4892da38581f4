"""The few lines a run prints at its end: what the whole run did (every session since step 0, when it was resumed)
and what this session added, how fast, how well, where everything went."""

from __future__ import annotations

from typing import Any

from timl.train.callbacks import TrainerState


def render(state: TrainerState, output_dir: str, hub: Any, *, flops_per_token: float, peak_flops: float | None,
           processes: int, main_written: bool) -> str:
    """`hub` is the hub group of the arguments: where the uploads went, if anywhere."""
    stopped = state.stopped_by and state.step < state.total_steps
    whole = f"{state.tokens:,} tokens in {format_seconds(state.elapsed_seconds)}"
    if state.session_start_step:
        session_tokens = (state.step - state.session_start_step) * state.tokens_per_step
        whole += (f" (this session: steps {state.session_start_step} to {state.step}, {session_tokens:,} tokens in "
                  f"{format_seconds(state.session_seconds)})")
    if stopped:
        lines = [f"timl: stopped by {state.stopped_by} at step {state.step} of {state.total_steps}, after {whole}."]
    else:
        lines = [f"timl: trained on {whole}."]
    if state.timed_seconds:
        speed = state.timed_tokens / state.timed_seconds
        mfu = f", MFU {speed / processes * flops_per_token / peak_flops:.1%}" if peak_flops else ""
        lines.append(f"  mean {speed:,.0f} tokens/s over the timed steps{mfu} (first steps and evals excluded)")
    if state.skipped_steps:
        steps = ", ".join(map(str, state.skipped_steps[:10])) + (", ..." if len(state.skipped_steps) > 10 else "")
        lines.append(f"  skipped {len(state.skipped_steps)} steps whose loss or grad norm was not finite: {steps}")
    if state.best_eval_loss is not None:
        lines.append(f"  best eval loss {state.best_eval_loss:.4f} at step {state.best_eval_step}")
    for key, (value, step) in sorted(state.best.items()):
        if key != "eval_loss":  # eval sets by name, task accuracies
            lines.append(f"  best {key} {value:.4f} at step {step}")
    model = (f"{output_dir}/main (AutoModelForCausalLM.from_pretrained)" if main_written
             else f"{output_dir}/step{state.step} (no main/ yet)")
    lines.append(f"  checkpoints: {output_dir}/step{{N}}/, model in {model}; metrics: {output_dir}/metrics.jsonl")
    if hub.push_to_hub:
        lines.append("  uploads: " + (f"https://huggingface.co/{hub.hub_model_id} (branches step{{N}} and main)"
                                      if hub.hub_target == "hub" else f"{hub.hub_target}/<revision>/"))
    if stopped:
        lines.append("  to continue it: the same command with --resume_from_checkpoint latest")
    else:
        lines.append("  to extend it: a larger --max_train_steps (or --max_train_tokens) with --resume_from_checkpoint "
                     "latest")
    return "\n".join(lines)



def nothing_to_do(saved: dict[str, Any], output_dir: str, total_steps: int) -> str:
    """The one line of a resumed run whose checkpoint (`saved`: its trainer state and path) is at its last step."""
    step = saved["step"]
    if step == total_steps and saved.get("final", True):
        return (f"timl: {output_dir} is already finished at step {step} ({output_dir}/main holds its model); "
                f"nothing to do.")
    return f"timl: {saved['path']} is at step {step}, and these arguments ask for {total_steps} steps; nothing to do."


def format_seconds(seconds: float) -> str:
    """A duration as the summary shows it: tenths below 10 s, whole seconds from 10 s."""
    return f"{seconds:,.0f} s" if seconds >= 10 else f"{seconds:.1f} s"

"""Where metrics go: `output_dir/metrics.jsonl` (always, main process only, appended on resume) and the trackers."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from timl.config.arguments import LoggingArguments
from timl.checkpoint.durable import atomic_file, write_json

logger = logging.getLogger(__name__)


def wandb_has_login() -> bool:
    """Whether W&B would find an API key, the way it looks for one: the environment, then ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def tracker_init_kwargs(args: LoggingArguments, output_dir: str, run_ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in args.trackers or "all" in args.trackers:
        wandb: dict[str, Any] = {"name": args.wandb_run_name, "dir": output_dir}
        if "wandb" in run_ids:
            # A resumed run continues the same W&B run rather than starting a duplicate.
            wandb.update(id=run_ids["wandb"], resume="allow")
        if not wandb_has_login() and os.environ.get("WANDB_MODE") is None:
            wandb["mode"] = "offline"
            logger.warning("No W&B login found: W&B runs offline. Upload later with `wandb sync %s/wandb`.",
                           output_dir)
        kwargs["wandb"] = wandb
    return kwargs


class RunLog:
    """Writes each log line to metrics.jsonl and to the trackers. Every process may call `log`; only the main writes."""

    def __init__(self, args: LoggingArguments, output_dir: str, accelerator: Accelerator, config: dict[str, Any],
                 resumed_step: int | None = None, run_ids: dict[str, str] | None = None):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path.parent / "run_config.json", config)
            # A fresh start keeps nothing of an earlier attempt (one that crashed before its first checkpoint).
            self._forget_after(resumed_step if resumed_step is not None else -1)
        if args.trackers:
            accelerator.init_trackers(args.wandb_project or "timl", config=_flat(config),
                                      init_kwargs=tracker_init_kwargs(args, output_dir, run_ids or {}))

    def _forget_after(self, step: int) -> None:
        """Drops the lines a killed run wrote after its last checkpoint: the resumed run writes them again."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        with atomic_file(self.path, "w") as file:
            file.write("".join(line + "\n" for line in lines))

    def run_ids(self) -> dict[str, str]:
        """The trackers' run ids, saved in checkpoints so that a resumed run continues the same runs."""
        ids = {}
        for tracker in self.accelerator.trackers:
            run = getattr(tracker, "run", None)
            if tracker.name == "wandb" and getattr(run, "id", None):
                ids["wandb"] = run.id
        return ids

    def log(self, values: dict[str, Any], step: int, elapsed_seconds: float) -> None:
        """Writes a line; `elapsed_seconds`, the whole run's time so far (see TrainerState), goes to the file only."""
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **finite_or_null(values), "elapsed_seconds": elapsed_seconds}
        with self.path.open("a") as file:
            file.write(json.dumps(record, allow_nan=False) + "\n")
        self.accelerator.log(values, step=step)

    def close(self) -> None:
        self.accelerator.end_training()


def finite_or_null(values: dict[str, Any]) -> dict[str, Any]:
    """The values with NaN and infinities as None: strict JSON has no such numbers, and jq and other readers
    refuse the bare NaN that Python would write."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in values.items()}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    # Trackers such as TensorBoard take only flat scalars and strings.
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat

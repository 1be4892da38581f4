"""Where metrics go: `output_dir/metrics.jsonl` (always, main process only, appended on resume) and the trackers."""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from timl.arguments import TrainingArguments

logger = logging.getLogger(__name__)


def wandb_has_login() -> bool:
    """Whether W&B would find an API key, the way it looks for one: the environment, then ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def tracker_init_kwargs(args: TrainingArguments) -> dict[str, dict[str, Any]]:
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in args.trackers or "all" in args.trackers:
        wandb = {"name": args.wandb_run_name, "dir": args.output_dir}
        if not wandb_has_login() and os.environ.get("WANDB_MODE") is None:
            wandb["mode"] = "offline"
            logger.warning("No W&B login found: W&B runs offline. Upload later with `wandb sync %s/wandb`.",
                           args.output_dir)
        kwargs["wandb"] = wandb
    return kwargs


class RunLog:
    """Writes each log line to metrics.jsonl and to the trackers. Every process may call `log`; only the main writes."""

    def __init__(self, args: TrainingArguments, accelerator: Accelerator, config: dict[str, Any]):
        self.accelerator = accelerator
        self.path = Path(args.output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            (self.path.parent / "run_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if args.trackers:
            accelerator.init_trackers(args.wandb_project or "timl", config=_flat(config),
                                      init_kwargs=tracker_init_kwargs(args))

    def log(self, values: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **values}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        self.accelerator.log(values, step=step)

    def close(self) -> None:
        self.accelerator.end_training()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    # Trackers such as TensorBoard take only flat scalars and strings.
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat

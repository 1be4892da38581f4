"""Two workers under torchrun, as in a preempted training job (run by tests/train/test_preemption.py):

    torchrun --nproc_per_node 2 tests/workers/preempted_workers.py OUT GRACE_SECONDS

Rank 0 uploads OUT/step1 through a GatedTarget while both ranks "train". Each rank votes on every step whether to
stop, as the Trainer does, so both stop at the same step once a SIGTERM has come. Rank 0 then gives the upload
GRACE_SECONDS, and the upload may finish only once that grace period has begun. Each rank ends by writing what it saw
to OUT/rank{R}.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from upload_targets import GatedTarget, open_gate_when_logged

from timl.train.preemption import PreemptionGuard
from timl.checkpoint.upload import Uploader


def main(out: Path, grace_seconds: float) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(name)s: %(message)s")
    with PreemptionGuard() as guard:
        uploader = None
        if rank == 0:
            uploader = Uploader(GatedTarget(out / "uploads", out / "upload_started", out / "gate"))
            uploader.submit(out / "step1", "step1")
        (out / f"rank{rank}.ready").touch()
        stop = torch.zeros(1)
        while not stop.item():
            time.sleep(0.05)  # a training step
            stop = torch.tensor([float(guard.requested)])
            dist.all_reduce(stop)
        report = {"signal": guard.received.name if guard.received else None}
        if uploader is not None:
            with open_gate_when_logged(out / "gate", "Waiting for 1 checkpoint upload(s) to finish"):
                report["failures"] = [failure.error for failure in uploader.close(timeout=grace_seconds)]
            report["upload_process_exitcode"] = uploader._process.exitcode
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]))

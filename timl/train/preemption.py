"""Graceful stops: the first SIGTERM or SIGINT asks the run to save and exit after the current step; a second
one exits at once.

A launcher forwards to its workers the signal that their process group already got: SLURM signals every process of
a job step and torchrun passes the same signal on; Ctrl-C reaches torchrun and its workers together and torchrun
forwards it. So a worker often receives one stop twice within milliseconds. A repeat within DUPLICATE_SECONDS of
the first is that copy, and is ignored; only a later one is a second request."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

logger = logging.getLogger(__name__)

DUPLICATE_SECONDS = 2.0


class PreemptionGuard:
    """A context manager that turns the first stop signal into a request the training loop polls (`requested`)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: signal.Signals | None = None
        self.received_at = 0.0
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> PreemptionGuard:
        # Python delivers signals to the main thread only; elsewhere (a notebook's worker thread) stay hands-off.
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and time.monotonic() - self.received_at < DUPLICATE_SECONDS:
            logger.warning("%s again within %.0f s: taken as the launcher's copy of the same stop; still saving.",
                           name, DUPLICATE_SECONDS)
            return
        if self.received is not None:
            logger.error("Second %s: exiting at once, without saving.", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received, self.received_at = signal.Signals(signum), time.monotonic()
        logger.warning("Received %s: finishing this step, then saving a checkpoint and exiting. Send it again to "
                       "exit at once.", name)

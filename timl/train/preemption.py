"""Graceful stops: the first SIGTERM or SIGINT asks the run to save and exit after the current step; a second
one exits at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)


class PreemptionGuard:
    """A context manager that turns the first stop signal into a request the training loop polls (`requested`)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: signal.Signals | None = None
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
        if self.received is not None:
            logger.error("Second %s: exiting at once, without saving.", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum)
        logger.warning("Received %s: finishing this step, then saving a checkpoint and exiting. Send it again to "
                       "exit at once.", name)

"""Stopping a run cleanly: SIGTERM / SIGINT finish the step, write a checkpoint, and end the run.

Schedulers (SLURM, Kubernetes, torchrun itself) stop a job with SIGTERM and
kill it some seconds later (torchrun waits 30 s). The handler only records
the request; the training loop sees it after the current optimizer step,
agrees on it with the other processes, writes ``checkpoint.pth`` and raises
``RunInterrupted``. ``deit train`` then exits with 128 + the signal number
(143 for SIGTERM, 130 for SIGINT), and ``--resume auto`` continues the run
exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signal_number: int, checkpoint: str | None) -> None:
        name = signal.Signals(signal_number).name
        where = f"; the checkpoint {checkpoint} continues it (--resume auto)" if checkpoint else ""
        super().__init__(f"stopped by {name} after finishing the step{where}")
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number


class StopRequest:
    """Set by a signal handler; read by the training loop after each step."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def request(self, signal_number: int) -> None:
        self.signal_number = signal_number


@contextlib.contextmanager
def stop_on_signals(request: StopRequest) -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT set ``request`` instead of ending the process.

    A second SIGINT while stopping raises KeyboardInterrupt at once, for a user
    who does not want to wait for the checkpoint. Outside the main thread
    (where Python cannot install handlers) nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signal_number: int, _frame: object) -> None:
        if request.requested and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        request.request(signal_number)

    previous = {number: signal.signal(number, handle) for number in STOP_SIGNALS}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)

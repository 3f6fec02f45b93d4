"""Progress of a loop: a bar on a terminal, a log line every few steps anywhere else.

A tqdm bar redrawn with carriage returns is right for a person at a
terminal, and wrong for a log file (SLURM, nohup, CI), where every redraw
is kept: a demo's log held thousands of bar frames per epoch. When stderr
is not a terminal, training logs one line every ``log_interval`` steps
instead (images/s, loss, learning rate, time left), as timm's and
torchvision's reference scripts do, and evaluation stays quiet.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("deit")


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class StepProgress:
    """Report ``total`` steps of a loop as it runs; ``enabled=False`` reports nothing."""

    def __init__(
        self,
        total: int,
        description: str,
        *,
        enabled: bool,
        log_interval: int = 50,
        stream: TextIO | None = None,
        log_lines: bool = True,
    ) -> None:
        self.total, self.description, self.log_interval = total, description, max(1, log_interval)
        terminal = on_terminal(stream)
        self.bar = tqdm(total=total, desc=description, disable=not (enabled and terminal), leave=False,
                        dynamic_ncols=True, file=stream)  # fmt: skip
        self.logs = enabled and not terminal and log_lines
        self.done, self.images, self.started = 0, 0, time.perf_counter()

    def update(self, images: int, **values: float) -> None:
        """One more step of ``images`` images; ``values`` (loss, lr) are shown next to it."""
        self.done += 1
        self.images += images
        self.bar.update()
        if values and not self.bar.disable:
            self.bar.set_postfix({name: f"{value:.3g}" for name, value in values.items()}, refresh=False)
        # the epoch's own summary line follows its last step, so that step needs no line of its own
        if self.logs and self.done % self.log_interval == 0 and self.done < self.total:
            elapsed = time.perf_counter() - self.started
            left = elapsed / self.done * (self.total - self.done)
            shown = "".join(f", {name} {value:.4g}" for name, value in values.items())
            log.info(
                "%s step %d/%d%s, %.0f im/s, %s left",
                self.description,
                self.done,
                self.total,
                shown,
                self.images / max(elapsed, 1e-9),
                datetime.timedelta(seconds=round(left)),
            )

    def close(self) -> None:
        self.bar.close()

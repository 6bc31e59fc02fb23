"""Progress for long evaluations: a tqdm bar on a terminal, a log line with rate and ETA otherwise."""

from __future__ import annotations

import logging
import sys
import time

from configs.cli import format_duration


class Progress:
    """`update(n)` after each unit of work; `close()` logs the total and the rate.

    On a terminal it draws a tqdm bar; in a log file (no TTY) it writes one line every
    `log_every_s` seconds: `ppl: 120/480 seq (35.2 seq/s, ETA 10s)`.
    """

    def __init__(self, total: int, desc: str, unit: str = "seq", *, log_every_s: float = 30.0, enabled: bool = True):
        self.total, self.desc, self.unit, self.log_every_s = int(total), desc, unit, log_every_s
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.log_every_s and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            logging.info("%s: %d/%d %s (%.1f %s/s, ETA %s)", self.desc, self.done, self.total, self.unit, rate,
                         self.unit, format_duration(eta))

    def close(self) -> float:
        """Closes the bar; returns the elapsed seconds."""
        elapsed = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            logging.info("%s: %d %s in %s (%.1f %s/s)", self.desc, self.done, self.unit, format_duration(elapsed),
                         self.done / max(elapsed, 1e-9), self.unit)
        return elapsed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

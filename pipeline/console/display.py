"""What the person at the console sees: our lines, and one progress display per long step.

On a terminal a progress bar (rich) is redrawn in place, with our lines printed above it. Anywhere
else (CI, a Ray job's log, a file) each step prints plain lines instead: its first and last update,
and one every `interval_s` between them, each with the estimated time left. Every update, shown or
not, goes to the full log.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TextIO

from pipeline.console.lines import MARKER, ProgressUpdate

PLAIN_INTERVAL_S = 10.0


@dataclass
class _Step:
    """One progress display: a rate measured from its first update, so start-up does not count."""

    noun: str
    total: int
    first_done: int
    first_at: float
    last_shown: float = 0.0
    bar: int | None = None  # rich's task id
    done: int = 0
    fields: str = ""

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def eta(self, now: float) -> str:
        moved = self.done - self.first_done
        if self.done >= self.total:
            return "done"
        if moved <= 0 or now <= self.first_at:
            return "ETA ?"
        return f"ETA {duration(max(0.0, (self.total - self.done) * (now - self.first_at) / moved))}"

    def amount(self) -> str:
        if self.noun == "bytes":
            return f"read {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        return f"{self.noun} {self.done}/{self.total}"

    def rate(self, now: float) -> str | None:
        if self.noun != "bytes" or now <= self.first_at:
            return None
        return f"{(self.done - self.first_done) / 1e6 / (now - self.first_at):.1f} MB/s"

    def plain(self, now: float) -> str:
        return " | ".join(part for part in [f"{MARKER} {self.amount()}", self.rate(now), self.fields, self.eta(now)]
                          if part)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Display:
    def __init__(self, out: TextIO, err: TextIO, log: TextIO, interactive: bool,
                 interval_s: float = PLAIN_INTERVAL_S):
        self.out, self.err, self.log = out, err, log
        self.interval_s = interval_s
        self.steps: dict[str, _Step] = {}
        self.lock = threading.RLock()
        self.bars = _rich_progress(out) if interactive else None

    def line(self, text: str, error: bool = False) -> None:
        """One of our lines (or an error), above any progress bar."""
        with self.lock:
            self._log(text)
            if self.bars is not None and not error:
                self.bars.console.print(text, markup=False, highlight=False, soft_wrap=True)
                return
            stream = self.err if error else self.out
            stream.write(text + "\n")
            stream.flush()

    def progress(self, update: ProgressUpdate) -> None:
        with self.lock:
            now = time.monotonic()
            step = self.steps.get(update.noun)
            if step is None or step.finished or update.done < step.done:  # a new run of that step
                step = self.steps[update.noun] = _Step(update.noun, update.total, update.done, now)
            step.done, step.total, step.fields = update.done, update.total, update.fields
            self._log(step.plain(now))
            if self.bars is not None:
                self._draw(step, now)
            elif step.finished or step.last_shown == 0.0 or now - step.last_shown >= self.interval_s:
                step.last_shown = now
                self.out.write(step.plain(now) + "\n")
                self.out.flush()

    def _draw(self, step: _Step, now: float) -> None:
        status = " | ".join(part for part in [step.rate(now), step.fields] if part)
        if step.bar is None:
            step.bar = self.bars.add_task(step.noun, total=step.total, amount=step.amount(), status=status,
                                          eta=step.eta(now))
            self.bars.start()
        self.bars.update(step.bar, completed=step.done, total=step.total, amount=step.amount(), status=status,
                         eta=step.eta(now))
        if step.finished:  # its last state becomes a line of its own: the live area shows running steps only
            self.bars.remove_task(step.bar)
            self.bars.console.print(step.plain(now), markup=False, highlight=False, soft_wrap=True)
        self.bars.refresh()  # every update is drawn, however soon the next one comes

    def _log(self, text: str) -> None:
        self.log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.log.flush()

    def close(self) -> None:
        with self.lock:
            if self.bars is not None:
                self.bars.stop()


def _rich_progress(out: TextIO):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.fields[amount]}"), BarColumn(bar_width=30), TextColumn("{task.fields[status]}"),
                    TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                    console=Console(file=out, force_terminal=True), refresh_per_second=4,
                    # Rich would swap sys.stdout for its own while a bar shows: library prints would then
                    # reach the terminal instead of the full log.
                    redirect_stdout=False, redirect_stderr=False)

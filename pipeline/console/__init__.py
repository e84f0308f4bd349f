"""The console of a `pipeline` command: our lines and progress on it, library output in a full log.

    say("...")                    one of our lines
    progress("tick", 12, 40, [..])  a step's progress (a bar on a terminal, plain lines elsewhere)
    with session(log_path): ...     a command's console (the CLI opens one per long command)

Inside a Ray worker there is no session: `say` and `progress` print marker lines, which Ray
forwards to the driver, whose session shows them (`pipeline.console.lines`).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path

from pipeline.console.display import duration
from pipeline.console.lines import MARKER, WARNING_MARKER, ProgressUpdate, parse_progress, progress_line
from pipeline.console.session import LOG_LEVEL_ENV, Session

_active: Session | None = None
_last_log: Path | None = None


@contextlib.contextmanager
def session(log_path: Path, verbose: bool = False, worker_lines: bool = True) -> Iterator[Session]:
    """Route this process's output for the block (see `pipeline.console.session`). An error that
    leaves the block leaves its traceback in the log; the caller says it in one line."""
    global _active, _last_log
    opened = Session(log_path, verbose, worker_lines)
    _active, _last_log = opened, log_path
    try:
        opened.display.line(f"{MARKER} full log: {log_path}")
        yield opened
    except BaseException:
        opened.log.write(traceback.format_exc())
        raise
    finally:
        _active = None
        opened.close()


def last_log() -> Path | None:
    """The full log of this process's latest console session (the one an error is reported after)."""
    return _last_log


def echo(text: str) -> None:
    """Our text as it is (a summary, a table), without the marker."""
    if _active is not None:
        _active.display.line(text)
    else:
        print(text, flush=True)


def say(text: str) -> None:
    """One of our lines; the marker is added unless the text has it."""
    line = text if text.startswith(MARKER) else f"{MARKER} {text}"
    update = parse_progress(line)  # a rank trained in this process reports its ticks this way too
    if _active is not None:
        _active.display.progress(update) if update is not None else _active.display.line(line)
    else:
        print(line, flush=True)


def warn(text: str) -> None:
    say(f"{WARNING_MARKER} {text}")


def error(text: str) -> None:
    """A command's failure, on stderr (no marker: `pipeline: ...`)."""
    if _active is not None:
        _active.display.line(text, error=True)
    else:
        import sys

        print(text, file=sys.stderr, flush=True)


def progress(noun: str, done: int, total: int, fields: list[str] | tuple = ()) -> None:
    """`done` of `total` `noun`s (tick, trial, bytes); `fields` are shown beside the count."""
    if _active is not None:
        _active.display.progress(ProgressUpdate(noun, done, total, " | ".join(fields)))
    else:
        print(progress_line(noun, done, total, list(fields)), flush=True)


__all__ = ["LOG_LEVEL_ENV", "MARKER", "WARNING_MARKER", "duration", "echo", "error", "last_log", "progress",
           "progress_line", "say", "session", "warn"]

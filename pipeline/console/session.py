"""One command's console: every line the process writes goes to its full log, and the console gets
ours, progress, and errors.

Libraries write to the console from everywhere: Python loggers with their own handlers, prints,
Ray's C++ core (straight to file descriptor 2) and the lines Ray forwards from its workers. So the
process's descriptors 1 and 2 are pointed at a pipe, and one thread reads it: each line goes to the
log file, and on to the console only when it is ours or an error (or always, when verbose). Our own
lines go straight to the console the process started with. A fatal crash still reaches it:
faulthandler writes there directly.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import TextIO

from pipeline.console.display import Display
from pipeline.console.lines import MARKER, WARNING_MARKER, Line, classify, known_warning, parse_progress

LOG_LEVEL_ENV = "PIPELINE_LOG_LEVEL"
_FLUSH_WAIT_S = 2.0


class Session:
    def __init__(self, log_path: Path, verbose: bool = False, worker_lines: bool = True):
        """`worker_lines`: show the `[pipeline]` lines Ray workers print (a training run's rank 0);
        a sweep keeps its trials' lines in the log, all but their warnings."""
        self.log_path = log_path
        self.verbose = verbose
        self.worker_lines = worker_lines
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        self._saved_streams = (sys.stdout, sys.stderr)
        out, err = _console_stream(sys.stdout, 1), _console_stream(sys.stderr, 2)
        self.display = Display(out, err, self.log, interactive=_is_terminal(out))
        self._sentinel = f"{MARKER} flush {uuid.uuid4().hex}"
        self._flushed = threading.Event()
        self._said: set[str] = set()  # known warnings already rewritten once
        self._saved_fds = (os.dup(1), os.dup(2))
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        sys.stdout = io.TextIOWrapper(io.FileIO(os.dup(1), "w"), encoding="utf-8", errors="replace", line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(2), "w"), encoding="utf-8", errors="replace", line_buffering=True)
        threading.Thread(target=self._pump, args=(read_end,), name="pipeline-console", daemon=True).start()
        self._handlers, self._replaced_handlers = _route_logging(self, verbose)
        if _has_fd(err):
            faulthandler.enable(file=err)

    # -- the pipe --------------------------------------------------------------------------------------
    def _pump(self, read_end: int) -> None:
        pending = b""
        while True:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                try:
                    self._route(classify(raw.decode("utf-8", errors="replace")))
                except Exception:  # noqa: BLE001 - a closed console must not stop the draining: writers would block
                    self._write_log(raw.decode("utf-8", errors="replace"))
        os.close(read_end)

    def _route(self, line: Line) -> None:
        if line.text == self._sentinel:
            self._flushed.set()
            return
        if line.is_ours and (self.worker_lines or line.text.startswith(WARNING_MARKER)):
            update = parse_progress(line.text) if line.level == "progress" else None
            if update is not None:
                self.display.progress(update)
            else:
                self.display.line(line.text)
            return
        shown = f"({line.source}) {line.text}" if line.source else line.text
        self._write_log(shown)
        if self.verbose:
            self.display.out.write(shown + "\n")
            self.display.out.flush()
        elif line.is_error:
            self.display.line(f"{shown}  [full log: {self.log_path}]", error=True)
        else:
            _, words = known_warning(line.text)
            if words is not None and words not in self._said:
                self._said.add(words)
                self.display.line(f"{WARNING_MARKER} {words}")

    def _write_log(self, text: str) -> None:
        if not self.log.closed:
            self.log.write(text + "\n")

    # -- the end ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Everything written so far reaches the log and the console; then the process's descriptors
        are its own again. What Ray's processes still write to the pipe keeps going to the log."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.write(1, (self._sentinel + "\n").encode())
        self._flushed.wait(_FLUSH_WAIT_S)
        for handler in self._handlers:
            logging.getLogger().removeHandler(handler)
        for handler in self._replaced_handlers:
            logging.getLogger().addHandler(handler)
        self.display.close()
        replaced = (sys.stdout, sys.stderr)
        os.dup2(self._saved_fds[0], 1)
        os.dup2(self._saved_fds[1], 2)
        for fd in self._saved_fds:
            os.close(fd)
        sys.stdout, sys.stderr = self._saved_streams
        for stream in replaced:
            stream.close()
        if faulthandler.is_enabled():
            faulthandler.enable(file=sys.__stderr__)


class _ConsoleHandler(logging.Handler):
    """Our loggers' records as our lines; any other logger's errors, first line only (the rest is
    in the full log). Library warnings and info stay in the log."""

    def __init__(self, session: Session):
        super().__init__(logging.INFO)
        self.session = session

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name == "pipeline" or record.name.startswith("pipeline.")
        if not ours and record.levelno < logging.ERROR:
            return
        message = record.getMessage().strip().splitlines()[0] if record.getMessage().strip() else ""
        if ours:
            prefix = WARNING_MARKER if record.levelno == logging.WARNING else MARKER
            text = f"{prefix} {message}" if record.levelno < logging.ERROR else f"{MARKER} error: {message}"
            self.session.display.line(text, error=record.levelno >= logging.ERROR)
        else:
            self.session.display.line(f"{record.name}: {message}  [full log: {self.session.log_path}]", error=True)


def _route_logging(session: Session, verbose: bool) -> tuple[list[logging.Handler], list[logging.Handler]]:
    """(the handlers added, the root's handlers they replace for the session: a basicConfig from before)."""
    root = logging.getLogger()
    replaced = list(root.handlers)
    for handler in replaced:
        root.removeHandler(handler)
    level = os.environ.get(LOG_LEVEL_ENV, "DEBUG" if verbose else "INFO").upper()
    root.setLevel(level)
    to_file = logging.StreamHandler(session.log)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handlers = [to_file] if verbose else [to_file, _ConsoleHandler(session)]
    if verbose:  # everything is echoed: our records too, as they are formatted in the log
        echo = logging.StreamHandler(session.display.out)
        echo.setFormatter(to_file.formatter)
        handlers.append(echo)
    for handler in handlers:
        root.addHandler(handler)
    logging.captureWarnings(True)  # Python warnings become records: in the log, not on the console
    return handlers, replaced


def _console_stream(stream: TextIO, fd: int) -> TextIO:
    """Where the console is: a copy of the descriptor the stream writes to (it is about to point at
    the pipe), or the stream itself when it has none (a test's captured output)."""
    if _has_fd(stream) and stream.fileno() == fd:
        return io.TextIOWrapper(io.FileIO(os.dup(fd), "w"), encoding=getattr(stream, "encoding", None) or "utf-8",
                                errors="replace", line_buffering=True)
    return stream


def _has_fd(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())

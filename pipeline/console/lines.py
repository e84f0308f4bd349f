"""What a line of output is: ours, a progress update, or a library's (and then at which level).

The console sees every line the command's process writes, and every line its Ray workers print
(Ray forwards them, prefixed with the worker's name and PID). Our own lines carry the `[pipeline]`
marker; a worker's progress is one of them in a fixed form (`[pipeline] tick 12/40 | loss ...`),
so a worker needs no channel but its output, and a log read without this console stays readable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARKER = "[pipeline]"
WARNING_MARKER = f"{MARKER} warning:"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?P<source>[^()]*?)(?: pid=\d+)?(?:, ip=[^)]*)?\) ?")  # "(RayTrainWorker pid=7) "
_PROGRESS = re.compile(r"^\[pipeline\] (?P<noun>[a-z]+) (?P<done>\d+)/(?P<total>\d+)(?: \| (?P<fields>.*))?$")

# Levels as the libraries write them: Python logging in Ray's, DeepSpeed's and the default formats,
# glog (Ray's C++ core: "[2026-12-02 14:47:58,351 E 123 456] core_worker.cc:2465: ..."), and
# Python's warnings ("file.py:12: UserWarning: ...").
_LEVELS = [
    re.compile(r"^\d{4}[-/]\d\d[-/]\d\d[ T][\d:,.]+\s+(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\b"),
    re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+\] \[(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\]"),
    re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)[:\s]"),
]
_GLOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ (?P<level>[IWEF]) \d+ \d+\]|^(?P<short>[IWEF])\d{4} ")
_GLOG_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
_PYTHON_WARNING = re.compile(r":\d+: \w*Warning: ")
_TRACEBACK = re.compile(r"^(Traceback \(most recent call last\):|\s+File \"|\s{2,}\S)")

# Library lines at error level that are not errors of the run, and why. They stay in the full log.
HARMLESS_ERRORS = [
    # Ray's core worker on every actor Ray Data restarts on failure whose constructor arguments sit in
    # the object store (ray-project/ray#53727): the tokenizing actors get the tokenizer that way, and
    # a lost argument would fail the preparation, which says so itself.
    re.compile(r"core_worker\.cc:\d+: .*has constructor arguments in the object store and max_restarts"),
]


# Library warnings whose cause we know: said once in our words (None: the full log only, and why).
KNOWN_WARNINGS: list[tuple[re.Pattern, str | None]] = [
    # The raylet counts worker processes against its CPUs; our fractional requests (tokenizing actors,
    # 0.5-CPU ranks, 0.01-CPU trial drivers) start more than that on purpose, on a small machine too.
    (re.compile(r"worker processes have been started on node"), None),
    (re.compile(r"cannot be scheduled right now\. It requires (?P<needs>\{[^}]*\})"),
     "Ray cannot place a task or actor that needs {needs} yet: the cluster has not got it free now "
     "(`ray status` shows what is taken); it waits until it has"),
]


def known_warning(text: str) -> tuple[bool, str | None]:
    """(known, our words for it)."""
    for pattern, words in KNOWN_WARNINGS:
        match = pattern.search(text)
        if match:
            return True, None if words is None else words.format(**match.groupdict())
    return False, None


@dataclass(frozen=True)
class Line:
    text: str  # without Ray's worker prefix and without colour codes
    source: str  # "" for this process, else Ray's name for the worker ("RayTrainWorker", "raylet", ...)
    level: str  # ours | progress | DEBUG | INFO | WARNING | ERROR | CRITICAL | traceback | plain

    @property
    def is_ours(self) -> bool:
        return self.level in ("ours", "progress")

    @property
    def is_error(self) -> bool:
        return self.level in ("ERROR", "CRITICAL") and not any(p.search(self.text) for p in HARMLESS_ERRORS)


@dataclass(frozen=True)
class ProgressUpdate:
    noun: str  # what is counted: tick, trial, ...
    done: int
    total: int
    fields: str  # "loss 3.1 | lr 1e-4 | ..." as the sender wrote them


def progress_line(noun: str, done: int, total: int, fields: list[str]) -> str:
    """The one form of a progress update on the wire (and in every plain log)."""
    return " | ".join([f"{MARKER} {noun} {done}/{total}", *fields])


def parse_progress(text: str) -> ProgressUpdate | None:
    match = _PROGRESS.match(text)
    if not match:
        return None
    return ProgressUpdate(match["noun"], int(match["done"]), int(match["total"]), match["fields"] or "")


def classify(raw: str) -> Line:
    """One captured line (no newline) as a `Line`."""
    text = _ANSI.sub("", raw).rstrip("\r\n")
    source = ""
    prefix = _RAY_PREFIX.match(text)
    if prefix and prefix["source"]:
        source, text = prefix["source"], text[prefix.end():]
    text = text.rsplit("\r", 1)[-1]  # a redrawn progress bar: its last state
    return Line(text, source, _level(text))


def _level(text: str) -> str:
    if text.startswith(MARKER):
        return "progress" if _PROGRESS.match(text) else "ours"
    for pattern in _LEVELS:
        match = pattern.match(text)
        if match:
            return match["level"]
    glog = _GLOG.match(text)
    if glog:
        return _GLOG_LEVELS[glog["level"] or glog["short"]]
    if _PYTHON_WARNING.search(text):
        return "WARNING"
    if _TRACEBACK.match(text):
        return "traceback"
    return "plain"

"""Rank 0's tracker during training: logging never waits for, or fails because of, the server.

Calls only queue the record. One background thread sends the queue in order; while the server is
unreachable it retries the oldest record with exponential backoff and keeps everything else
buffered, so a tracking outage costs no training time and, once the server is back, nothing is
missing. At the end, `close` waits a bounded time for the queue to drain and writes whatever is
still unsent to a JSON-lines file (named in a warning) rather than dropping it.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path

from pipeline.tracking.secrets import redact
from pipeline.tracking.store import RunTarget, Tracker

# MLflow retries a failed request itself for minutes by default; here the thread does the retrying,
# so a request gets one short try and the thread stays responsive to close().
_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 30.0


class BufferedTracker:
    def __init__(self, target: RunTarget, flush_timeout_s: float, spill_dir: Path):
        for name, value in _CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        self.target = target
        self.flush_timeout_s = flush_timeout_s
        self.spill_dir = spill_dir
        self.failures = 0  # failed send attempts (retried)
        self.rejected = 0  # records the server refused outright (spilled, not retried)
        self._tracker = Tracker(target)
        self._pending: collections.deque[tuple[str, tuple]] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._send_forever, name="tracking-sender", daemon=True)
        self._thread.start()

    def tags(self) -> dict[str, str]:
        return self._tracker.tags()

    def history(self, key: str) -> dict[int, float]:
        """Read at once, not queued: the caller decides what to do if the server is down."""
        return self._tracker.history(key)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        # Stamped now, not when sent: after an outage the history still shows when each tick happened.
        self._put("log_metrics", (dict(metrics), step, timestamp_ms or int(time.time() * 1000)))

    def unsent_metrics(self) -> list[tuple[dict, int, int]]:
        """(metrics, step, timestamp) not yet accepted by the server: a checkpoint carries them, so a
        worker killed before they were sent does not lose them."""
        with self._wake:
            return [args for method, args in self._pending if method == "log_metrics"]

    def log_params(self, params: dict) -> None:
        self._put("log_params", (dict(params),))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put("set_tags", (dict(tags),))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put("log_text", (text, artifact_file))

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        self._put("log_table", ({name: list(values) for name, values in columns.items()}, artifact_file))

    def close(self) -> str | None:
        """Drain within flush_timeout_s; returns a warning naming the spill file if some remained."""
        deadline = time.monotonic() + self.flush_timeout_s
        with self._wake:
            self._closing = True
            self._wake.notify_all()
            while self._pending and time.monotonic() < deadline:
                self._wake.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            unsent = list(self._pending)
            self._pending.clear()
        warnings = []
        if self.rejected:
            warnings.append(f"the tracking server rejected {self.rejected} records; they are in {self._spill_file}")
        if unsent:
            self._spill(unsent)
            warnings.append(f"the tracking server at {redact(self.target.uri)} stayed unreachable; {len(unsent)} "
                            f"unsent records were written to {self._spill_file}")
        return "warning: " + "; ".join(warnings) if warnings else None

    @property
    def _spill_file(self) -> Path:
        return self.spill_dir / f"unsent-tracking-{self.target.run_id}.jsonl"

    def _spill(self, items: list[tuple[str, tuple]]) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        with self._spill_file.open("a") as handle:
            for method, args in items:
                handle.write(redact(json.dumps({"method": method, "args": args})) + "\n")

    def _put(self, method: str, args: tuple) -> None:
        with self._wake:
            self._pending.append((method, args))
            self._wake.notify_all()

    def _send_forever(self) -> None:
        backoff = BACKOFF_START_S
        while True:
            with self._wake:
                while not self._pending:
                    if self._closing:
                        return
                    self._wake.wait()
                item = self._pending[0]
            try:
                getattr(self._tracker, item[0])(*item[1])
            except Exception as error:  # noqa: BLE001 - a failure to log never stops training
                if _rejected(error):  # retrying cannot help (a deleted run, an invalid value): keep it aside
                    self.rejected += 1
                    self._spill([item])
                    self._done(item)
                    continue
                self.failures += 1
                with self._wake:  # close() cuts a long wait short; then retries come at most 2 s apart
                    closing = self._closing or self._wake.wait_for(lambda: self._closing, timeout=backoff)
                if closing:
                    time.sleep(min(backoff, 2.0))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_START_S
            self._done(item)

    def _done(self, item: tuple[str, tuple]) -> None:
        with self._wake:
            if self._pending and self._pending[0] is item:  # close() may have spilled it meanwhile
                self._pending.popleft()
            self._wake.notify_all()


def _rejected(error: Exception) -> bool:
    """A 4xx answer other than 429: the server is up and refuses this record; a retry gets the same."""
    status = getattr(error, "get_http_status_code", lambda: None)()
    return isinstance(status, int) and 400 <= status < 500 and status != 429

"""The console: what a line is, what the console shows of it, and what reaches the full log, from
hand-written lines up to a real `pipeline train` on a pseudo-terminal and a run that fails in a worker."""

import io
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.cli import main
from pipeline.console.display import Display
from pipeline.console.lines import ProgressUpdate, classify, known_warning, parse_progress, progress_line
from pipeline.locations import location_overrides

from conftest import REPO, SHARED_CACHES, TINY_YAML

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize("raw, source, level", [
    ("\x1b[36m(RayTrainWorker pid=26240)\x1b[0m [pipeline] noise: off", "RayTrainWorker", "ours"),
    ("(RayTrainWorker pid=7) [pipeline] tick 3/40 | loss 3.1 | 130 tok/s", "RayTrainWorker", "progress"),
    ("(TrainController pid=9) Started training worker group of size 2: ", "TrainController", "plain"),
    ("(RayTrainWorker pid=7, ip=10.0.0.2) [2026-12-02 14:47:58,351] [WARNING] [real_accelerator.py:213:"
     "get_accelerator] Setting accelerator to CPU.", "RayTrainWorker", "WARNING"),
    ("2026-12-02 14:47:36,332\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled", "",
     "WARNING"),
    ("2026/12/02 14:54:13 WARNING mlflow.transformers: Unable to find license information", "", "WARNING"),
    ("[2026-12-02 14:56:39,878 E 1927 1927] core_worker.cc:2465: Actor with class name: 'X' and ID: '4' has "
     "constructor arguments in the object store and max_restarts > 0.", "", "ERROR"),
    ("E1202 14:56:39.878 1927 raylet.cc:12: lost", "", "ERROR"),
    ("/x/y.py:12: UserWarning: a python warning", "", "WARNING"),
    ("Traceback (most recent call last):", "", "traceback"),
    ("Loading weights:  50%|█████     | 1/2 [00:00<?, ?it/s]\rLoading weights: 100%|██████████| 2/2", "", "plain"),
])
def test_a_line_is_classified_by_its_source_and_level(raw, source, level):
    line = classify(raw)
    assert (line.source, line.level) == (source, level)
    assert "\x1b" not in line.text and "pid=" not in line.text


def test_the_actor_arguments_error_is_known_harmless_and_other_core_errors_are_not():
    harmless = classify("[2026-12-02 14:56:39,878 E 1 1] core_worker.cc:2465: Actor with class name: 'M' and ID: "
                        "'4' has constructor arguments in the object store and max_restarts > 0. If ...")
    real = classify("[2026-12-02 14:56:39,878 E 1 1] core_worker.cc:901: Failed to connect to the GCS")
    assert (harmless.is_error, real.is_error) == (False, True)


def test_known_warnings_are_said_in_our_words_or_kept_in_the_log():
    assert known_warning("(raylet) WARNING: 8 PYTHON worker processes have been started on node: x") == (True, None)
    known, words = known_warning("Warning: The actor or task with ID ab12 cannot be scheduled right now. It requires "
                                 "{CPU: 0.500000} for placement, however the cluster currently cannot provide ...")
    assert known and words.startswith("Ray cannot place a task or actor that needs {CPU: 0.500000} yet")
    assert known_warning("WARNING something else") == (False, None)


def test_a_progress_line_round_trips():
    line = progress_line("tick", 12, 40, ["loss 3.1000", "130 tok/s"])
    assert line == "[pipeline] tick 12/40 | loss 3.1000 | 130 tok/s"
    assert parse_progress(line) == ProgressUpdate("tick", 12, 40, "loss 3.1000 | 130 tok/s")
    assert parse_progress("[pipeline] tick 4: eval loss 5.9") is None  # an eval result is a line, not progress


def test_plain_progress_prints_first_last_and_at_intervals_with_the_time_left(monkeypatch):
    clock = iter([100.0, 110.0, 111.0, 130.0, 131.0])  # one reading per update
    monkeypatch.setattr("pipeline.console.display.time.monotonic", lambda: next(clock))
    out, log = io.StringIO(), io.StringIO()
    display = Display(out, io.StringIO(), log, interactive=False, interval_s=15.0)
    for done in (1, 2, 3, 5, 10):
        display.progress(ProgressUpdate("tick", done, 10, "loss 2.0"))
    shown = out.getvalue().splitlines()
    # tick 1 (first), tick 5 (30 s after the last shown), tick 10 (last); 2 and 3 came too soon
    assert shown == ["[pipeline] tick 1/10 | loss 2.0 | ETA ?",
                     "[pipeline] tick 5/10 | loss 2.0 | ETA 38s",  # 4 ticks in 30 s, 5 to go: 37.5 s
                     "[pipeline] tick 10/10 | loss 2.0 | done"]
    assert len(log.getvalue().splitlines()) == 5  # every update is in the full log


SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from pathlib import Path
    from pipeline import console
    with console.session(Path(sys.argv[1]), verbose=sys.argv[2] == "verbose"):
        os.write(2, b"[2026-12-02 14:47:58,351 E 12 34] core_worker.cc:77: the GCS is gone\\n")  # C level, fd 2
        print("(TrainController pid=3) Requesting resources: {'CPU': 0.5} * 2")
        logging.getLogger("ray.data").warning("Execution plan of Dataset ...")
        logging.getLogger("pipeline.data").warning("a bad record was skipped")
        warnings.warn("deprecated thing")
        print("(RayTrainWorker pid=5) [pipeline] noise: off")
        console.say("ours")
    print("after the session")
""")


def test_the_console_shows_ours_and_errors_and_the_log_keeps_everything(tmp_path):
    log = tmp_path / "full.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "quiet"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    shown = done.stdout.splitlines()
    assert (shown[0], shown[-1]) == (f"[pipeline] full log: {log}", "after the session")
    # A forwarded line (through the pipe) and a direct one may swap places; none is lost or added.
    assert sorted(shown[1:-1]) == ["[pipeline] noise: off", "[pipeline] ours", "[pipeline] warning: a bad record was skipped"]
    assert done.stderr.splitlines() == [f"[2026-12-02 14:47:58,351 E 12 34] core_worker.cc:77: the GCS is gone  "
                                        f"[full log: {log}]"]
    kept = log.read_text()
    for library_line in ("(TrainController) Requesting resources", "Execution plan of Dataset", "UserWarning: deprecated"):
        assert library_line in kept


def test_verbose_shows_every_line_again(tmp_path):
    log = tmp_path / "full.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "verbose"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for library_line in ("(TrainController) Requesting resources", "WARNING ray.data: Execution plan of Dataset",
                         "core_worker.cc:77: the GCS is gone", "UserWarning: deprecated thing"):
        assert library_line in done.stdout, done.stdout
    assert "(TrainController) Requesting resources" in log.read_text()  # and the log keeps them all the same


def library_lines(text: str) -> list[str]:
    """Lines a library's logger, Ray's core, or Python's warnings wrote."""
    patterns = [r"^\d{4}[-/]\d\d[-/]\d\d [\d:,.]+\s+(DEBUG|INFO|WARNING|ERROR)\b", r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[",
                r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [IWEF] \d+ \d+\]", r"Warning: ", r"^\(\w+ pid=\d+\)"]
    return [line for line in text.splitlines() if any(re.search(p, line) for p in patterns)]


def check_quiet_console(out: str, log_text: str, library: tuple[str, ...]) -> None:
    """What the issue asks of a command's console and full log (tests/test_cli.py runs `prepare` and
    `train`): no library line on the console, the log's path on it, and the `library` lines in the log."""
    assert library_lines(out) == [], library_lines(out)
    assert re.search(r"^\[pipeline\] full log: \S+\.log$", out, re.M)
    for library_line in library:
        assert library_line in log_text, library_line


def pty_run(args: list[str], cwd, timeout: float, drop_env: tuple[str, ...] = ()) -> tuple[int, str]:
    """A command on a pseudo-terminal: its exit code and everything it drew."""
    leader, follower = pty.openpty()
    env = {name: value for name, value in os.environ.items() if name not in drop_env}
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, cwd=cwd, start_new_session=True,
                            env={**env, "COLUMNS": "160"})
    os.close(follower)
    drawn, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 1 << 16)
                except OSError:  # the follower side closed: the command ended
                    break
                if not chunk:
                    break
                drawn += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), drawn.decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        os.close(leader)


def terminal_frames(drawn: str) -> list[str]:
    """What a terminal showed, one redraw or line each, without colours and cursor moves."""
    return [ANSI.sub("", frame) for frame in re.split(r"[\r\n]", drawn)]


# The progress bar on a pseudo-terminal is checked in test_mlflow_ui.py, on the run it browses.


@pytest.mark.slow
def test_a_failure_inside_a_worker_is_one_line_naming_the_full_log(ray_session, tmp_path, capsys):
    # A learning rate that turns the loss to nan at the second tick: every rank stops there.
    code = main(["train", "--config", str(TINY_YAML), *location_overrides(tmp_path), *SHARED_CACHES, "train.lr=1e9",
                 "tracking.log_model=false"])
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    log = re.search(r"^\[pipeline\] full log: (\S+)$", captured.out, re.M)[1]
    assert len(errors) == 1, errors
    # Ray Train reports the ranks whose error reached it before it stopped the group: one or both.
    assert re.fullmatch(r"pipeline: training failed: ranks? [01](, 1)?: NonFiniteLoss: the training loss is (nan|inf) at "
                        r"tick \d+ \(train.lr 1e\+09, .*\): lower train.lr or check the data \(full log: (\S+)\)",
                        errors[0]), errors[0]
    assert errors[0].endswith(f"(full log: {log})")
    assert "Traceback" not in captured.out + captured.err
    assert "NonFiniteLoss" in open(log).read()  # the workers' tracebacks are in the full log

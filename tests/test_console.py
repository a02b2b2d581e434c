"""The quiet terminal (lm_lexicon.console): the project's lines and bars on the terminal, everything else in the log.

Each case runs a small script in a subprocess with its stdout and stderr on pipes, as a terminal would see them, and
reads the log afterwards. One case starts a private local Ray (its own RAY_TMPDIR) to check that a Ray worker's
print lands in the log and that a worker feeds a bar on the driver.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, os, subprocess, sys, time, warnings
from lm_lexicon.console import pipeline_terminal, bar, stage, RemoteBars, step_reporter
with pipeline_terminal(sys.argv[1], verbose="--verbose" in sys.argv) as term:
    print("library print to stdout")
    os.write(2, b"C-level write to fd 2\\n")
    logging.getLogger("mlflow").info("a library's info")
    warnings.warn("a deprecation somewhere")
    subprocess.run(["sh", "-c", "echo child process output; echo child err >&2"])
    term.line("[x] project line")
    logging.getLogger("lm_lexicon.artifacts").warning("needs your action")
    logging.getLogger("transformers").error("a library error\\nsecond line")
    with stage("x"):
        with bar("counting", total=3, unit="things") as b:
            for _ in range(3):
                b.advance()
    if "--ray" in sys.argv:
        import ray
        from lm_lexicon.ray_utils import init_ray
        init_ray()  # under the terminal: workers' output is forwarded to the driver, i.e. to the log

        @ray.remote(num_cpus=0)
        def work(address):
            report = step_reporter(address, "job")
            print("a worker says hi")
            for i in range(1, 5):
                report(i, 4, 1.0 / i)
                time.sleep(0.2)

        with stage("y"), RemoteBars(["job"], unit="steps") as bars:
            ray.get(work.remote(bars.address))
    if "--fail" in sys.argv:
        try:
            raise ValueError("boom\\nmore detail")
        except ValueError as e:
            term.fail(e)
    term.line(term.summary())
print("after the context")
"""


def _run(tmp_path: Path, *flags: str) -> tuple[list[str], list[str], str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COLUMNS")}
    env.update(PYTHONPATH=str(REPO / "platform"), RAY_TMPDIR=tempfile.mkdtemp(prefix="lmlx-ray-"))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), *flags], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "logs" / "pipeline.log").read_text()
    return proc.stdout.splitlines(), proc.stderr.splitlines(), log


LIBRARY_LINES = ("library print to stdout", "C-level write to fd 2", "a library's info", "a deprecation somewhere",
                 "child process output", "child err", "a library error")


@pytest.mark.ray
def test_only_the_projects_lines_reach_the_terminal_and_everything_reaches_the_log(tmp_path):
    out, err, log = _run(tmp_path, "--ray")
    log_path = tmp_path / "run" / "logs" / "pipeline.log"
    assert out[0] == "[x] project line"
    assert re.fullmatch(r"\[x\] counting ━+ 3/3 things \S+\s*", out[1]), out
    assert re.fullmatch(r"\[y\] job ━+ 4/4 steps \S+ loss 0\.250\s*", out[2]), out
    assert out[3:] == [f"log: {log_path} (1 warning, 1 error above)", "after the context"]
    # what needs the user: one line each, pointing at the log
    assert err == [f"warning: needs your action (details: {log_path})",
                   f"error: a library error (details: {log_path})"]
    for line in LIBRARY_LINES + ("second line", "Started a local Ray instance", "a worker says hi"):
        assert line in log, line
    assert re.search(r"\(work pid=\d+\) a worker says hi", log)  # the worker's print, forwarded by Ray
    assert "\x1b[" not in log  # no colour codes (RAY_COLOR_PREFIX=0)
    assert re.search(r"^\S+ \S+ INFO lm_lexicon\.terminal: \[x\] project line$", log, re.M)  # time-stamped copy


def test_verbose_shows_the_libraries_live_and_keeps_the_log(tmp_path):
    out, err, log = _run(tmp_path, "--verbose")
    text = "\n".join(out)
    for line in LIBRARY_LINES:
        assert line in text and line in log, line
    assert "[x] project line" in out and out[-1] == "after the context"
    assert err == [f"warning: needs your action (details: {tmp_path / 'run' / 'logs' / 'pipeline.log'})"]


def test_the_error_that_ends_a_run_is_one_line_and_its_traceback_is_in_the_log(tmp_path):
    out, err, log = _run(tmp_path, "--fail")
    log_path = tmp_path / "run" / "logs" / "pipeline.log"
    assert err[-1] == f"error: ValueError: boom (traceback: {log_path})"
    assert "Traceback (most recent call last)" in log and "more detail" in log
    assert not any("Traceback" in line for line in out + err)


def test_outside_a_terminal_bars_and_remote_bars_do_nothing():
    from lm_lexicon.console import RemoteBars, bar, capturing, step_reporter

    assert not capturing()
    with bar("anything", total=3) as b:
        b.advance(2)
        b.update(completed=3, note="x")
    with RemoteBars(["job"]) as bars:
        assert bars.address is None
    assert step_reporter(None, "job") is None

"""What a user sees when the pipeline runs: the micro pipeline as ``jobs/pipeline.py`` in a subprocess (the session's
``micro_run``, tests/conftest.py), its stdout and stderr on pipes as a terminal would get them.

The terminal must hold only the project's lines (the ``[stage]`` lines, one final bar per unit of work, the summary
table and the example rows) and nothing on stderr; Ray's, Tune's, transformers' and MLflow's output, and what the Ray workers printed,
must be in ``<output_dir>/logs/pipeline.log``.
"""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.ray

STAGE_LINE = re.compile(r"^\[(data|partition|experts|merge|evaluate|export)\] ")
TABLE_LINE = re.compile(r"^[┏┃┡│└├]|^\s+tiny: test split, 6 rows\s*$"
                        r"|^\s+What the models write \(5 test lines spread over the sample\)\s*$")
OTHER_LINES = (re.compile(r"^lm-lexicon pipeline 'tiny': logs of Ray, Tune, transformers and MLflow go to \S+/logs/"
                          r"pipeline\.log \(--verbose shows them\)$"),
               re.compile(r"^report: \S+/evaluate/report\.html \(markdown: \S+/evaluate/report\.md\)$"),
               re.compile(r"^pipeline finished in [\d.]+s; artifacts under \S+; log: \S+/logs/pipeline\.log$"))
BAR = r" ━+ {done}/{done} {unit} \S+"


@pytest.fixture(scope="module")
def run(micro_run):
    return micro_run


def test_the_terminal_holds_only_the_projects_lines(run):
    lines = run["stdout"]
    strangers = [line for line in lines if line.strip() and not (
        STAGE_LINE.match(line) or TABLE_LINE.match(line) or any(p.match(line) for p in OTHER_LINES))]
    assert strangers == [], strangers
    assert run["stderr"] == []  # no warning or error needed the user
    text = "\n".join(lines)
    for noise in ("logging_progress", "core_worker", "Started a local Ray", "Configuration for experiment",
                  "TensorBoard", "mlflow", "Loading weights", "Writing model shards", "pid=", "Warning"):
        assert noise not in text, noise
    print(f"\nmicro pipeline: {len(lines)} terminal lines in {run['seconds']:.0f}s")


def test_every_stage_shows_its_progress_with_its_own_numbers(run):
    text = "\n".join(run["stdout"])
    assert re.search(r"^\[partition\] embedding prompts" + BAR.format(done=48, unit="rows"), text, re.M)
    for job in ("expert_0", "expert_1", "dense"):  # steps and loss per expert
        assert re.search(rf"^\[experts\] {job}\s*" + BAR.format(done=2, unit="steps") + r" loss \d+\.\d{3}", text,
                         re.M), f"{job}:\n{text}"
    assert re.search(r"^\[merge\] fine-tune" + BAR.format(done=2, unit="steps") + r" loss \d+\.\d{3}", text, re.M)
    assert re.search(r"^\[evaluate\] generating with moe" + BAR.format(done=6, unit="rows"), text, re.M)
    for stage in ("data", "partition", "experts", "merge", "evaluate", "export"):
        assert f"[{stage}] done in" in text


def test_the_log_holds_ray_and_the_libraries(run):
    log = run["log"]
    for line in ("Started a local Ray instance",  # the driver's Ray
                 "Configuration for experiment",  # Tune's reporter
                 "mlflow",  # MLflow's logger
                 "(TrainController pid=",  # Ray Train's controller actor, forwarded from its worker process
                 "(RayTrainWorker pid="):  # a training worker
        assert line in log, line
    assert re.search(r"INFO lm_lexicon\.terminal: \[merge\] done in", log)  # the project's lines, time-stamped
    assert re.search(r"INFO lm_lexicon\.terminal: \[experts\] expert_0: 2/2 steps loss \d", log)  # bars' last state
    assert "\x1b[" not in log

"""A local Ray start that times out (a busy machine) is cleaned up and tried again; other errors are not retried."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from lm_lexicon import ray_utils

TIMEOUT = ("The current node timed out during startup. This could happen because some of the raylet failed to "
           "startup or the GCS has become overloaded.")


class FakeRay:
    """``ray.init`` that fails ``failures`` times with ``message``, each time leaving a process behind as Ray does."""

    def __init__(self, failures: int, message: str = TIMEOUT):
        self.failures, self.message = failures, message
        self.calls: list[dict] = []
        self.left: list[subprocess.Popen] = []

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            self.left.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
            raise Exception(self.message)


@pytest.fixture
def bystander():
    """A child process started before Ray: the clean-up must leave it alone."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_timed_out_start_is_cleaned_up_and_started_again(bystander, caplog):
    fake = FakeRay(failures=2)
    with caplog.at_level(logging.WARNING, logger="lm_lexicon.ray_utils"):
        ray_utils._start_local_ray(fake, {"num_cpus": 2})
    assert fake.calls == [{"num_cpus": 2}] * 3
    assert [p.poll() is not None for p in fake.left] == [True, True]  # gone before the next attempt returned
    assert bystander.poll() is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "attempt 1 of 3" in warnings[0] and "stopped the 1 process(es)" in warnings[0]


def test_a_start_that_keeps_timing_out_raises_after_the_last_attempt():
    fake = FakeRay(failures=ray_utils.LOCAL_START_ATTEMPTS)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_utils._start_local_ray(fake, {})
    assert len(fake.calls) == ray_utils.LOCAL_START_ATTEMPTS
    assert [p.poll() is not None for p in fake.left[:-1]] == [True] * (ray_utils.LOCAL_START_ATTEMPTS - 1)
    assert fake.left[-1].poll() is None  # the last attempt's processes are left as Ray left them without the retry
    fake.left[-1].kill()
    fake.left[-1].wait()


def test_any_other_start_error_is_raised_at_once():
    fake = FakeRay(failures=1, message="object_store_memory is too small")
    with pytest.raises(Exception, match="too small"):
        ray_utils._start_local_ray(fake, {})
    assert len(fake.calls) == 1
    fake.left[0].kill()
    fake.left[0].wait()

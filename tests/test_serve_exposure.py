"""An unauthenticated API is not exposed beyond this machine unless asked for (lm_lexicon.serving.exposure).

* the address check and the message, without Ray;
* ``lm-lexicon serve --host 0.0.0.0`` without a token exits 2 with the message before Ray starts (a subprocess: the
  command stops the Ray it runs in, which must not be the session's);
* the Serve-config path (``serve run serve_app/serve_config.yaml``: HTTP on 0.0.0.0, the app built from args): the
  ingress refuses to start without a token and the deployment fails with the message (``serve status`` shows it).
  Served on the session's Ray. The opt-out (``--insecure``, which sets ``insecure: true`` for the ingress) is served
  on 0.0.0.0 end to end by tests/test_shutdown.py; a token on 0.0.0.0 is the unit test's case (the token itself:
  tests/test_serve_app.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lm_lexicon.serving.exposure import ExposureError, check_exposure, is_loopback
from test_serve_app import _args, _free_port, pipeline_dir  # noqa: F401 (pipeline_dir is a fixture)
from test_serving_api import _fake_pipeline

REPO = Path(__file__).resolve().parents[1]
APP = "exposure-test"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_addresses(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.20", "no-such-host.invalid", ""])
def test_addresses_reachable_from_elsewhere_or_unknown(host):
    assert not is_loopback(host)


def test_check_exposure_refuses_a_public_address_without_a_token_and_names_the_fixes():
    with pytest.raises(ExposureError) as refused:
        check_exposure("0.0.0.0", None, False, token_env="MY_TOKEN")
    message = str(refused.value)
    assert "refusing to serve on 0.0.0.0 without authentication" in message
    assert "export MY_TOKEN=<secret>" in message and "127.0.0.1" in message and "--insecure" in message
    assert check_exposure("0.0.0.0", "s3cret", False, token_env="MY_TOKEN") is None  # a token: fine anywhere
    assert check_exposure("127.0.0.1", None, False, token_env="MY_TOKEN") is None  # loopback: fine without
    warning = check_exposure("0.0.0.0", None, True, token_env="MY_TOKEN")
    assert warning.startswith("WARNING: serving on 0.0.0.0 without authentication (--insecure)")


def _cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from lm_lexicon.cli import app; app()", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_serve_refuses_0_0_0_0_without_a_token_before_ray_starts(tmp_path):
    out = _fake_pipeline(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("LM_LEXICON_API_TOKEN", "RAY_ADDRESS")}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")  # were Ray started, its session would appear here
    t0 = time.perf_counter()
    res = _cli("serve", str(out), "--host", "0.0.0.0", "--port", str(_free_port()), env=env)
    seconds = time.perf_counter() - t0
    assert res.returncode == 2, res.stdout + res.stderr
    text = " ".join((res.stdout + res.stderr).split())
    assert "refusing to serve on 0.0.0.0 without authentication" in text
    assert "export LM_LEXICON_API_TOKEN=<secret>" in text and "--insecure" in text
    assert not (tmp_path / "ray").exists()  # refused before Ray started
    print(f"\nrefused in {seconds:.1f}s")


@pytest.fixture
def public_serve(ray_local):
    """Serve's HTTP proxy on 0.0.0.0 (as serve_app/serve_config.yaml has it); shut down afterwards."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "0.0.0.0", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_serve_config_path_refuses_without_a_token(public_serve, pipeline_dir, monkeypatch):
    from ray import serve

    from serve_app.app import build_app

    monkeypatch.delenv("LM_LEXICON_API_TOKEN", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as failed:  # serve.run raises when a deployment fails to start
        serve.run(build_app(_args(pipeline_dir)), name=APP, route_prefix="/")
    refused_s = time.perf_counter() - t0
    assert "Ingress" in str(failed.value)
    message = serve.status().applications[APP].deployments["Ingress"].message  # what `serve status` shows
    assert "refusing to serve on 0.0.0.0 without authentication" in message, message
    assert "insecure: true in the Serve args" in message
    with httpx.Client(base_url=public_serve, timeout=60) as client:
        assert client.post("/v1/definitions", json={"items": [{"term": "bank"}]}).status_code != 200
    serve.delete(APP)
    print(f"\nrefused deployment failed in {refused_s:.1f}s")

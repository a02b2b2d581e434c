"""``lm-lexicon serve <output_dir>``: start the Serve application on this machine (or a running cluster).

Locally every deployment reserves 0 CPUs by default (the replicas share the machine's cores, one torch thread
each) so that all experts fit on a laptop; pass an args file to reserve CPUs/GPUs as on a cluster.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

LOCAL_DEFAULTS = {"ingress": {"num_cpus": 0}, "router": {"num_cpus": 0}, "scorer": {"num_cpus": 0},
                  "expert": {"num_cpus": 0}}
APP_NAME = "lm-lexicon"


def repo_root() -> Optional[Path]:
    """The checkout holding ``serve_app/`` (editable installs: ``platform/lm_lexicon`` -> the repo), or the cwd."""
    import lm_lexicon

    for candidate in (Path(lm_lexicon.__file__).resolve().parents[2], Path.cwd()):
        if (candidate / "serve_app" / "app.py").is_file():
            return candidate
    return None


def local_args(output_dir: str | Path, overrides: Optional[dict] = None, *, local_resources: bool = True) -> dict:
    """ServeArgs for a local run: ``output_dir``, zero CPU reservations (``local_resources``), then ``overrides``."""
    from lm_lexicon.serving.app_config import deep_merge

    args: dict = {"output_dir": str(Path(output_dir).resolve())}
    if local_resources:
        args = deep_merge(args, LOCAL_DEFAULTS)
    return deep_merge(args, overrides or {})


def serve_local(output_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                overrides: Optional[dict] = None, address: Optional[str] = None, num_cpus: Optional[int] = None,
                local_resources: bool = True, insecure: bool = False, block: bool = True,
                log: Callable[[str], None] = print) -> str:
    """Start Ray (or connect to ``address``), Serve's HTTP proxy on ``host:port``, and the application. Blocks
    until Ctrl-C (then shuts Serve down) unless ``block=False``. Returns the base URL.

    A non-loopback ``host`` needs a bearer token or ``insecure=True``
    (:class:`~lm_lexicon.serving.exposure.ExposureError` otherwise, before anything starts). Stopping every process
    on SIGTERM is the caller's :func:`lm_lexicon.ray_utils.clean_exit` (``lm-lexicon serve`` runs inside one)."""
    import ray
    from ray import serve

    from lm_lexicon.ray_utils import reclaim_stop_signals

    root = repo_root()
    if root is None:
        raise RuntimeError("cannot find serve_app/ (run from the lm-lexicon checkout)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from serve_app.app import build_app  # validates args and finds the artifacts before Ray starts

    args = local_args(output_dir, {**(overrides or {}), **({"insecure": True} if insecure else {})},
                      local_resources=local_resources)
    app = build_app(args)
    warning = _check_exposure(host, args)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        from ray.job_config import JobConfig

        init_kw = dict(namespace="serve", job_config=JobConfig(code_search_path=[str(root)]),
                       log_to_driver=False)
        if address:
            ray.init(address=address, **init_kw)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **init_kw)
        reclaim_stop_signals()  # ray.init replaced the clean exit's SIGTERM handler
    serve.start(http_options={"host": host, "port": int(port)})
    t0 = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    if warning:
        log(warning)
    log(f"lm-lexicon is serving {Path(output_dir)} at {url} (ready in {time.perf_counter() - t0:.0f} s): "
        f"POST {url}/v1/definitions, docs at {url}/docs" + ("; Ctrl-C or SIGTERM stops it" if block else ""))
    if not block:
        return url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("shutting down")
    finally:
        serve.shutdown()
    return url


def _check_exposure(host: str, args: dict) -> Optional[str]:
    """:func:`~lm_lexicon.serving.exposure.check_exposure` with the token the ingress will read (this machine's
    environment, the args or the pipeline config's ``serve.auth_token_env``)."""
    from lm_lexicon.serving.app_config import read_pipeline_config, resolve_args, resolve_token
    from lm_lexicon.serving.exposure import check_exposure

    sa = resolve_args(args, read_pipeline_config(Path(args["output_dir"]))[0])
    return check_exposure(host, resolve_token(sa.auth_token, sa.auth_token_env), sa.insecure,
                          token_env=sa.auth_token_env)

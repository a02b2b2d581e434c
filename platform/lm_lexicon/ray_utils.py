"""Starting or joining Ray with resources that fit the machine.

On a laptop Ray is started locally with capped CPUs and a small object store (Ray's defaults take 30% of RAM); under
`ray job submit` or with an address configured, the running cluster is joined and its resources are used as they are.
"""
from __future__ import annotations

import os


def init_ray(resources=None, *, log_to_driver: bool = False):
    """Idempotent ``ray.init`` for the stages; returns the cluster's resources.

    Under the pipeline's terminal (:mod:`lm_lexicon.console`) the workers' output is forwarded to the driver, whose
    output goes to the run's log: the log then holds what every worker printed."""
    import ray

    from lm_lexicon.console import capturing

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = (resources.ray_address if resources is not None else None) or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": log_to_driver or capturing(),
                    "include_dashboard": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        if resources is not None and resources.num_cpus:
            kwargs["num_cpus"] = resources.num_cpus
        if resources is not None and resources.object_store_memory_mb:
            kwargs["object_store_memory"] = resources.object_store_memory_mb * 1024 * 1024
        ray.init(**kwargs)
    return ray.cluster_resources()


def quiet_ray_data() -> None:
    """No wall of Ray Data logs: its progress bars per operator in an interactive terminal, none under the
    pipeline's terminal (which shows its own bars and sends Ray Data's output to the log)."""
    import ray.data

    from lm_lexicon.console import capturing

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not capturing()
    ctx.print_on_execution_start = False

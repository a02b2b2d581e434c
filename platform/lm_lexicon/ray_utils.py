"""Starting or joining Ray with resources that fit the machine.

On a laptop Ray is started locally with capped CPUs and a small object store (Ray's defaults take 30% of RAM); under
`ray job submit` or with an address configured, the running cluster is joined and its resources are used as they are.
"""
from __future__ import annotations

import os


def init_ray(resources=None, *, log_to_driver: bool = False):
    """Idempotent ``ray.init`` for the stages; returns the cluster's resources."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = (resources.ray_address if resources is not None else None) or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": log_to_driver, "include_dashboard": False}
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
    """Progress bars per operator, not a wall of Ray Data logs, in a terminal."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False

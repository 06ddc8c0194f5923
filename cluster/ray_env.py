"""Where work runs: the one place that calls `ray.init`.

No address (and no RAY_ADDRESS): an embedded local Ray sized by `ray.num_cpus`. Otherwise connect
to the given cluster; the resources then come from the cluster itself.
"""

from __future__ import annotations

import os


def init_ray(ray_cfg, address: str | None = None) -> str:
    """Start or connect to Ray once per process; return a one-line description."""
    import ray

    address = address or ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "ray: already initialized"
    # vLLM's engine spawns processes; Ray workers inherit this and need no fork-safety dance.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"ray: connected to {address}"
    kwargs = {"num_cpus": ray_cfg.num_cpus, "include_dashboard": False, "log_to_driver": False}
    if ray_cfg.object_store_memory:
        kwargs["object_store_memory"] = ray_cfg.object_store_memory
    ray.init(**kwargs)
    return f"ray: embedded local ({ray_cfg.num_cpus} logical CPUs)"


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()

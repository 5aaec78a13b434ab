"""Connecting to Ray, the same way for every stage."""

from __future__ import annotations

import logging
from typing import Any


def start_ray(workers: int, address: str | None) -> bool:
    """Connect to the cluster at `address`, else start local Ray with `workers` CPUs.

    Returns True when this call started the connection (so the caller must shut it down);
    an already initialised Ray is reused."""
    import ray

    if ray.is_initialized():
        return False
    common: dict[str, Any] = {
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "configure_logging": False,
    }
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, **common)
    return True

"""Connecting to Ray, the same way for every stage."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def start_ray(workers: int, address: str | None) -> bool:
    """Connect to the cluster at `address`, else start local Ray with `workers` CPUs.

    Returns True when this call started the connection (so the caller must shut it down);
    an already initialised Ray is reused.

    Quiet by design: workers' output stays in Ray's session logs (`log_to_driver=False`), and
    Ray's Python loggers print nothing of their own: their records go to the application's
    logging (under the CLI, eyehub's log file; the terminal only for errors). What Ray's
    native code writes to standard error cannot be configured here; the CLI sends it to the
    log file too (`eyehub.logs`)."""
    import ray

    if ray.is_initialized():
        return False
    # With configure_logging=False, ray.init removes the handler Ray put on the "ray"
    # logger at import, before it logs anything (token notice, "Started a local Ray
    # instance"); propagating hands those records to the root logger's handlers.
    logging.getLogger("ray").propagate = True
    common: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "configure_logging": False,
    }
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, **common)
    log.debug("Ray started (%s)", address or f"local, {workers} CPUs")
    return True

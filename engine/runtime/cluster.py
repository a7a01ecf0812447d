"""The one place cfaudit starts or joins Ray.

Locally Ray binds to loopback only: `_node_ip_address=127.0.0.1`, the dashboard on 127.0.0.1, and
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, without which Ray 2.60's agents still use the machine's
non-loopback address. Token auth stays as Ray configures it.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

LOOPBACK = "127.0.0.1"


def loopback_env() -> dict[str, str]:
    """Environment that keeps a local Ray on loopback (also for worker processes)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
              include_dashboard: bool = False) -> None:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start a local Ray bound to 127.0.0.1 (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    # `ray job submit` runs the driver with RAY_ADDRESS set: join that cluster, not a private local Ray.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    for key, value in loopback_env().items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",  # always a new local instance, never a cluster another process left running
        _node_ip_address=LOOPBACK,
        dashboard_host=LOOPBACK,
        include_dashboard=include_dashboard,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": loopback_env()},
    )


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()

"""The one place cfaudit starts or joins Ray.

Locally Ray binds to loopback only: `_node_ip_address=127.0.0.1`, the dashboard on 127.0.0.1, and
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, without which Ray 2.60's agents still use the machine's
non-loopback address. Token auth stays as Ray configures it.

Ray's own output: by default only its errors reach the terminal (`ray.init(logging_level=ERROR,
log_to_driver=False)`, Ray Data's console handler at ERROR); its INFO/WARNING lines stay in the session's log
files (/tmp/ray/session_*/logs, ray-data/ray-data.log). CFAUDIT_RAY_LOGS=1 (`--verbose`) shows them all.
Failures still reach the user: a failed task raises in the driver, and Ray's error channel (a worker that
died, out of memory) prints regardless of log_to_driver. One line stays: Ray Data's actor pools put their
constructor arguments in the object store with max_restarts > 0, and the driver's core worker (C++) logs that
once per process at error level (`core_worker.cc ... has constructor arguments in the object store`, ray issue
53727). Only RAY_BACKEND_LOG_LEVEL=fatal would hide it at the source, and that variable is inherited by the
raylet, GCS and workers ray.init starts (their log files would lose every error), so instead the CLI drops that
one line from its own stderr (`ray_stderr_filter`), passing everything else through.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Iterator, Optional

LOOPBACK = "127.0.0.1"
RAY_LOGS_ENV = "CFAUDIT_RAY_LOGS"  # "1": Ray's own INFO/WARNING lines and the workers' output too (`--verbose`)


# The line Ray's C++ core worker writes once per Ray Data actor pool (ray issue 53727); nothing is wrong.
HARMLESS_RAY_LINE = re.compile(rb"core_worker\.cc:\d+: Actor with class name: '[^']*' and ID: '[0-9a-f]+' has "
                               rb"constructor arguments in the object store and max_restarts > 0")


@contextlib.contextmanager
def ray_stderr_filter(enabled: bool = True) -> Iterator[None]:
    """While active, this process's stderr (file descriptor 2, where Ray's C++ code logs) passes through a pipe
    that drops HARMLESS_RAY_LINE and forwards every other line at once. Python logging cannot reach that line."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = [line + b"\n" for line in lines if not HARMLESS_RAY_LINE.search(line)]
                if kept:
                    os.write(saved, b"".join(kept))
        if pending and not HARMLESS_RAY_LINE.search(pending):
            os.write(saved, pending)
        os.close(saved)

    thread = threading.Thread(target=forward, name="cfaudit-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end this process holds: the reader drains and ends
        thread.join(timeout=2)  # processes started meanwhile (Ray's) may hold it open: the daemon goes on then


def loopback_env() -> dict[str, str]:
    """Environment that keeps a local Ray on loopback (also for worker processes)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def ray_logs_shown() -> bool:
    return os.environ.get(RAY_LOGS_ENV, "") == "1"


def quiet_ray_data() -> None:
    """Ray Data's console handler at ERROR: "Starting execution of Dataset ...", its execution plan, "Progress bars
    disabled" and the like go only to its session file handler (ray-data.log), which keeps every level."""
    import ray.data  # noqa: F401  (importing it configures the `ray.data` logger, replacing its handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the session file handlers are not streams
            handler.setLevel(logging.ERROR)


def ray_output() -> dict:
    """`ray.init`'s output settings: Ray's defaults with CFAUDIT_RAY_LOGS=1, else errors only. ERROR on the
    driver's `ray` logger hides e.g. authentication_token_setup's "Token authentication is enabled" warning
    (token auth itself stays on); log_to_driver=False keeps the workers' stdout/stderr in their log files."""
    shown = ray_logs_shown()
    if not shown:
        quiet_ray_data()
    return {"logging_level": logging.INFO if shown else logging.ERROR, "log_to_driver": shown}


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
              include_dashboard: bool = False) -> None:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start a local Ray bound to 127.0.0.1 (idempotent)."""
    import ray  # deferred: Ray loads only when a job starts it, not on importing the engine

    if ray.is_initialized():
        return
    # `ray job submit` runs the driver with RAY_ADDRESS set: join that cluster, not a private local Ray.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_output())
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
        runtime_env={"env_vars": loopback_env()},
        **ray_output(),
    )


def stop_ray() -> None:
    import ray  # deferred: Ray loads only when a job starts it, not on importing the engine

    if ray.is_initialized():
        ray.shutdown()

"""Starting model hosts: a probe that ends a job whose hosts cannot start, instead of Ray restarting them forever.

Ray 2.60 restarts an actor whose process dies in its constructor without end under `max_restarts=-1` (which the
pool needs, so that a host dying on one unit is replaced), and Ray Data waits on it. So one host is first built
alone, with `max_restarts=0`, before the pool starts; and the pool must be up within `host_start_timeout_s`.
"""
from __future__ import annotations

import time


class HostStartError(ValueError):
    """No model host can start: its constructor raises, its process dies in it, or the cluster has no room."""


class HostProbe:
    """A ModelHost built alone, outside Ray Data's pool; keeps what its constructor raised (the host is dropped)."""

    def __init__(self, host_cls: type, kwargs: dict) -> None:
        try:
            host_cls(**kwargs)
            self.error = ""
        except Exception as err:  # noqa: BLE001 - the driver reports it as the reason no host can start
            self.error = f"{type(err).__name__}: {err}"

    def raised(self) -> str:
        return self.error


def probe_host(host_cls: type, kwargs: dict, resources: dict, attempts: int, timeout_s: float) -> None:
    """Start one host as an actor Ray never restarts, then stop it; raise HostStartError if it cannot start.

    Ray Data's pool runs its hosts with max_restarts=-1 (so a host killed on one unit is replaced), and Ray
    restarts an actor whose process died in its constructor just the same: forever, and the job never ends.
    Here a constructor that raises ends the job at once, a process that dies in it `attempts` times ends it
    then, and a host not up within timeout_s (no room in the cluster, a constructor that hangs) at the deadline.
    """
    import ray  # deferred: Ray loads only when a job starts hosts

    deadline = time.monotonic() + timeout_s
    for _ in range(attempts):
        probe = ray.remote(HostProbe).options(max_restarts=0, **resources).remote(host_cls, kwargs)
        try:
            error = ray.get(probe.raised.remote(), timeout=max(deadline - time.monotonic(), 0.001))
        except ray.exceptions.GetTimeoutError:
            wanted = ", ".join(f"{key}={value:g}" for key, value in resources.items())
            raise HostStartError(f"the model host did not start within {timeout_s:g} s "
                                 f"(runtime.host_start_timeout_s): the cluster has no room for one ({wanted}), "
                                 "or its constructor hangs") from None
        except ray.exceptions.RayActorError:
            continue  # its process died in the constructor
        finally:
            ray.kill(probe)
        if error:
            raise HostStartError(f"the model host could not start: its constructor raised {error}")
        return
    raise HostStartError(f"the model host could not start: its process died {attempts} times in its constructor "
                         "(killed, out of memory, or a crash in native code; runtime.max_retries + 1 attempts)")


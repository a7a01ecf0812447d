"""The driver's scheduler: one Ray actor per model host, each unit routed to the host that holds its model.

Why not Ray Data's actor pool (what ran the units before): its pool hands a block to whichever actor is free
and cannot send a unit to the actor that has the unit's model loaded, so with A hosts and M models every host
ends up loading every model (A x M loads, A x M models resident). Here the driver keeps the hosts itself and
asks `Placement` which unit a free host runs next; the hosts read their queries from the dataset's files.

Faults: a host whose process dies (killed, out of memory, a native crash) is restarted by Ray
(`max_restarts=-1`); the unit it was running is re-run on whichever host is free next, up to
`runtime.max_retries` times, then recorded failed as HostDied. A host that does not (re)start within
`runtime.host_start_timeout_s` is dropped; when no host is left, the remaining units fail with why. One unit
in flight per host, so a death is always charged to the unit that was running.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from engine.runtime.host_start import HostStartError
from engine.runtime.placement import Placement, Queued
from engine.runtime.plan import WorkUnit, unit_descriptor


def host_died(times: int) -> str:
    return (f"HostDied: the host process died {times} times running this unit (killed, out of memory, or a "
            "crash in native code)")


@dataclass
class HostAccount:
    """What one host slot did over the job, restarts included (a restarted host reports afresh)."""

    units: int = 0
    model_loads: int = 0
    peak_resident: int = 0
    peak_rss_mib: float = 0.0
    pids: list[int] = field(default_factory=list)
    restarts: int = 0
    rows_by_pid: dict[int, int] = field(default_factory=dict)  # query rows each of its processes decoded
    reference_by_pid: dict[int, int] = field(default_factory=dict)  # train rows decoded for reference logits

    @property
    def rows_read(self) -> int:
        return sum(self.rows_by_pid.values())

    @property
    def reference_rows_read(self) -> int:
        return sum(self.reference_by_pid.values())

    def add(self, result: dict[str, Any]) -> None:
        self.units += 1
        self.model_loads += len(result.get("loaded_models", ()))
        self.peak_resident = max(self.peak_resident, int(result.get("peak_resident", 0)))
        self.peak_rss_mib = max(self.peak_rss_mib, float(result.get("peak_rss_mib", 0.0)))
        pid = int(result.get("pid", 0))
        if pid and pid not in self.pids:
            self.pids.append(pid)
        self.rows_by_pid[pid] = int(result.get("rows_read", 0))
        self.reference_by_pid[pid] = int(result.get("reference_rows_read", 0))


@dataclass
class ScheduleAccount:
    hosts: dict[int, HostAccount]
    model_loads: dict[str, int]
    models_per_host: int
    start_seconds: float = 0.0  # until the first host was ready (Ray placing it, its constructor)
    run_seconds: float = 0.0  # from then until the last unit's result: the hosts' throughput is units / this

    def as_dict(self) -> dict[str, Any]:
        return {"hosts": [{"host": str(i), "pid": (a.pids or [0])[-1], "pids": a.pids, "units": a.units,
                           "model_loads": a.model_loads, "peak_resident": a.peak_resident,
                           "peak_rss_mib": round(a.peak_rss_mib, 1), "restarts": a.restarts,
                           "rows_read": a.rows_read, "reference_rows_read": a.reference_rows_read}
                          for i, a in sorted(self.hosts.items())],
                "model_loads": dict(sorted(self.model_loads.items())), "models_per_host": self.models_per_host,
                "host_start_seconds": round(self.start_seconds, 3), "host_run_seconds": round(self.run_seconds, 3)}


def run_scheduled(host_cls: type, host_kwargs: dict, todo: list[WorkUnit], runtime: Any,
                  on_result: Callable[[dict[str, Any]], None], log: Callable[[str], None],
                  while_starting: Callable[[], None] = lambda: None,
                  share_when_warm: bool = False) -> ScheduleAccount:
    """Run `todo` on `runtime.num_actors` hosts; `on_result` gets each unit's summary row (with `attempts`
    counting every run of the unit, host deaths included, and `error` empty unless it failed).
    `share_when_warm`: a second host takes a model's units only after a first has returned one (Placement).
    `while_starting` runs once the hosts are created, while they start (the start probe); if it raises, the
    hosts are stopped and the error goes to the caller."""
    import ray  # deferred: Ray loads only when a job runs units

    resources = {"num_cpus": runtime.num_cpus_per_actor, "num_gpus": runtime.num_gpus_per_actor}
    actor_cls = ray.remote(host_cls).options(max_restarts=-1, max_task_retries=0, **resources)
    hosts = {i: actor_cls.remote(**host_kwargs) for i in range(runtime.num_actors)}
    placement = Placement(todo, list(hosts), runtime.models_per_host, share_when_warm=share_when_warm)
    account = ScheduleAccount({i: HostAccount() for i in hosts}, {}, runtime.models_per_host)
    limit = runtime.host_start_timeout_s
    pings: dict[Any, tuple[int, float]] = {}  # ready() call -> (host, deadline)
    running: dict[Any, tuple[int, Queued]] = {}  # run() call -> (host, unit)
    free: list[int] = []
    started, t0, first_ready = False, time.monotonic(), None
    for i, host in hosts.items():
        pings[host.ready.remote()] = (i, time.monotonic() + limit)
    try:
        while_starting()
        while placement.pending() or running:
            _dispatch(hosts, placement, free, running, force=not running and not pings)
            if not running and not pings:
                break  # no host left to run the rest: the caller records them failed
            waiting = list(running) + list(pings)
            timeout = max(min(d for _, d in pings.values()) - time.monotonic(), 0) if pings else None
            done, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
            if not done:  # a host's start deadline passed
                _drop_late_hosts(pings, hosts, started, limit, log)
                continue
            ref = done[0]
            if ref in pings:
                i, deadline = pings.pop(ref)
                try:
                    ray.get(ref)
                    free.append(i)
                    started = True
                    if first_ready is None:
                        first_ready = time.monotonic()
                        account.start_seconds = first_ready - t0
                except ray.exceptions.ActorUnavailableError:  # restarting: ask again until its deadline
                    time.sleep(0.5)
                    pings[hosts[i].ready.remote()] = (i, deadline)
                except ray.exceptions.RayError as err:  # dead for good (its constructor raised)
                    log(f"  model host {i} could not start ({type(err).__name__}); dropped")
                continue
            i, queued = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError:  # its process died (or the call could not reach it): run it again
                account.hosts[i].restarts += 1
                placement.host_lost(i)
                pings[hosts[i].ready.remote()] = (i, time.monotonic() + limit)
                if queued.attempt > runtime.max_retries:
                    on_result({"unit_id": queued.unit.unit_id, "rows": 0, "success": 0, "seconds": 0.0,
                               "error": host_died(queued.attempt), "attempts": queued.attempt})
                else:
                    placement.requeue(Queued(queued.unit, queued.attempt + 1))
                continue
            account.hosts[i].add(result)
            placement.done(queued.unit.model_id)
            for model_id in result.get("loaded_models", ()):
                account.model_loads[model_id] = account.model_loads.get(model_id, 0) + 1
            result["attempts"] = queued.attempt - 1 + int(result.get("attempts", 1))
            on_result(result)
            free.append(i)
            account.run_seconds = time.monotonic() - (first_ready or t0)
        if placement.pending():
            error = "HostStartError: no model host is left to run this unit (every host failed to start or restart)"
            for queue in placement.queues.values():
                while queue:
                    queued = queue.popleft()
                    on_result({"unit_id": queued.unit.unit_id, "rows": 0, "success": 0, "seconds": 0.0,
                               "error": error, "attempts": queued.attempt - 1})
    finally:
        for host in hosts.values():
            ray.kill(host)
    return account


def _dispatch(hosts: dict, placement: Placement, free: list[int], running: dict, force: bool) -> None:
    """Give every free host its next unit; `force`: nothing else would run, so a host takes any unit."""
    for i in list(free):
        queued: Optional[Queued] = placement.next_unit(i, force=force)
        if queued is None:
            continue
        free.remove(i)
        running[hosts[i].run.remote(unit_descriptor(queued.unit))] = (i, queued)
        force = False


def _drop_late_hosts(pings: dict, hosts: dict, started: bool, limit: float, log: Callable[[str], None]) -> None:
    now = time.monotonic()
    late = [ref for ref, (_, deadline) in pings.items() if deadline <= now]
    if not started and len(late) == len(pings) == len(hosts):
        raise HostStartError(f"the {len(hosts)} model host(s) did not start within {limit:g} s "
                             "(runtime.host_start_timeout_s): the cluster has no room for them (lower "
                             "runtime.num_actors), or their processes die while starting")
    for ref in late:
        i, _ = pings.pop(ref)
        log(f"  model host {i} did not (re)start within {limit:g} s (runtime.host_start_timeout_s); dropped")

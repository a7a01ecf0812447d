"""Which unit a free model host runs next, so that each model is loaded on as few hosts as possible.

Pure bookkeeping (no Ray): the driver's scheduler asks `next_unit(host)` whenever a host is free. The
placement mirrors each host's least-recently-used set of resident models (the host evicts in the same order
with the same budget), and picks, in this order:
1. a unit of a model the host holds (the most recently used first), so a model's units stay where it is;
2. a unit of a model no host holds (in plan order), so every model is loaded once;
3. a unit of a model another host holds that still has at least `steal_min` units queued, so no host idles
   while work is left (the only case a model is loaded twice: at the tail, or a fleet smaller than the pool).
   With `share_when_warm`, only once a host has returned a result of that model: what the first host computes
   on loading it (Gradual Construction's reference logits, engine.runtime.reference) is then in the job's store,
   so a second host reads it instead of computing it again.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Hashable, Optional

from engine.runtime.plan import WorkUnit


@dataclass
class Queued:
    unit: WorkUnit
    attempt: int = 1  # the attempt this run will be (a unit re-queued after its host died runs again)


@dataclass
class HostSlot:
    resident: "OrderedDict[str, None]" = field(default_factory=OrderedDict)  # least recently used first
    loads: int = 0
    peak_resident: int = 0


class Placement:
    def __init__(self, units: list[WorkUnit], hosts: list[Hashable], models_per_host: int, steal_min: int = 2,
                 share_when_warm: bool = False):
        self.budget = models_per_host
        self.steal_min = steal_min
        self.share_when_warm = share_when_warm
        self.warm: set[str] = set()  # models a host has returned a result of
        self.queues: "OrderedDict[str, deque[Queued]]" = OrderedDict()
        for unit in units:
            self.queues.setdefault(unit.model_id, deque()).append(Queued(unit))
        self.hosts = {host: HostSlot() for host in hosts}
        self.loads: dict[str, int] = {}  # model id -> times a host loaded it

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def holders(self, model_id: str) -> list[Hashable]:
        return [h for h, slot in self.hosts.items() if model_id in slot.resident]

    def next_unit(self, host: Hashable, force: bool = False) -> Optional[Queued]:
        """The unit `host` runs next (taken off its queue), or None when it should stay idle; `force`: any
        unit left (when no other host would run it)."""
        slot = self.hosts[host]
        waiting = [m for m, q in self.queues.items() if q]
        if not waiting:
            return None
        held = [m for m in reversed(slot.resident) if m in waiting]
        if held:
            model = held[0]
        else:
            unheld = [m for m in waiting if not self.holders(m)]
            if unheld:
                model = unheld[0]
            else:
                least = 1 if force else self.steal_min
                stealable = [m for m in waiting if len(self.queues[m]) >= least
                             and (force or not self.share_when_warm or m in self.warm)]
                if not stealable:
                    return None
                model = max(stealable, key=lambda m: len(self.queues[m]))
        self._use(slot, model)
        return self.queues[model].popleft()

    def _use(self, slot: HostSlot, model: str) -> None:
        if model in slot.resident:
            slot.resident.move_to_end(model)
            return
        slot.resident[model] = None
        slot.loads += 1
        self.loads[model] = self.loads.get(model, 0) + 1
        while len(slot.resident) > self.budget:
            slot.resident.popitem(last=False)
        slot.peak_resident = max(slot.peak_resident, len(slot.resident))

    def done(self, model_id: str) -> None:
        """A host returned a result of this model (with `share_when_warm`, its queue may be shared from now)."""
        self.warm.add(model_id)

    def requeue(self, queued: Queued) -> None:
        """A unit whose host died runs again next (first in its model's queue)."""
        self.queues.setdefault(queued.unit.model_id, deque()).appendleft(queued)

    def host_lost(self, host: Hashable) -> None:
        """A host restarted (its process died): it holds nothing now."""
        self.hosts[host].resident.clear()

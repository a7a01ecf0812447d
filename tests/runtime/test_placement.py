"""Routing: a model's units stay on the host that holds it, each model is loaded about once, the LRU budget
holds, and no host idles while another has a queue to share."""
import numpy as np

from engine.runtime.placement import Placement, Queued
from engine.runtime.plan import WorkUnit


def _units(models: int, per_model: int) -> list[WorkUnit]:
    return [WorkUnit(f"m{m:02d}", "wachter", part, np.arange(4, dtype=np.int64))
            for m in range(models) for part in range(per_model)]


def _drain(placement: Placement, hosts: list[int]) -> list[tuple[int, str]]:
    """Round-robin over the hosts, as equal-speed hosts would ask: [(host, model)] in run order."""
    order = []
    while placement.pending():
        progressed = False
        for host in hosts:
            queued = placement.next_unit(host)
            if queued is not None:
                order.append((host, queued.unit.model_id))
                progressed = True
        if not progressed:
            queued = placement.next_unit(hosts[0], force=True)
            order.append((hosts[0], queued.unit.model_id))
    return order


def test_fifty_models_on_two_hosts_load_each_model_about_once():
    placement = Placement(_units(50, 6), [0, 1], models_per_host=4)
    order = _drain(placement, [0, 1])
    assert len(order) == 300
    assert sum(placement.loads.values()) <= 1.2 * 50
    assert max(slot.peak_resident for slot in placement.hosts.values()) <= 4
    assert {h for h, _ in order} == {0, 1}
    assert abs(sum(h == 0 for h, _ in order) - 150) <= 12  # the work is shared about evenly


def test_a_model_stays_on_its_host_until_its_queue_is_empty():
    placement = Placement(_units(4, 5), [0, 1], models_per_host=2)
    runs: dict[str, set[int]] = {}
    for host, model in _drain(placement, [0, 1]):
        runs.setdefault(model, set()).add(host)
    assert all(len(hosts) == 1 for hosts in runs.values()), runs
    assert sum(placement.loads.values()) == 4


def test_one_model_is_shared_by_every_host():
    placement = Placement(_units(1, 10), [0, 1, 2], models_per_host=1)
    order = _drain(placement, [0, 1, 2])
    assert {h for h, _ in order} == {0, 1, 2}
    assert placement.loads == {"m00": 3}


def test_the_budget_evicts_the_least_recently_used_model():
    placement = Placement(_units(3, 1), [0], models_per_host=2)
    assert [placement.next_unit(0).unit.model_id for _ in range(3)] == ["m00", "m01", "m02"]
    assert list(placement.hosts[0].resident) == ["m01", "m02"]
    assert placement.hosts[0].peak_resident == 2


def test_a_unit_whose_host_died_runs_next_and_the_host_holds_nothing():
    placement = Placement(_units(2, 3), [0, 1], models_per_host=2)
    first = placement.next_unit(0)
    placement.host_lost(0)
    placement.requeue(Queued(first.unit, first.attempt + 1))
    again = placement.next_unit(1)
    assert again.unit == first.unit and again.attempt == 2
    assert placement.holders(first.unit.model_id) == [1]


def test_a_short_queue_held_elsewhere_is_left_to_its_host_unless_forced():
    placement = Placement(_units(1, 2), [0, 1], models_per_host=1)
    placement.next_unit(0)
    assert placement.next_unit(1) is None  # one unit left: host 0 finishes it without a second load
    assert placement.next_unit(1, force=True) is not None

"""Engine metrics through ray.util.metrics, exported by Ray's metrics agent (Prometheus) for Grafana.

  cfaudit_queries_done      counter   queries whose unit was written
  cfaudit_queries_failed    counter   queries of units that failed every retry
  cfaudit_unit_seconds      histogram wall time of a unit (method, metrics and write)
  cfaudit_units_in_flight   gauge     units a host is working on (sum over hosts)
all tagged by `model` and `method`; Prometheus sees them as ray_<name> (counters ray_<name>_total), which
dashboards/grafana/cfaudit.json charts. Outside Ray (tests, in-process use) they are no-ops.
"""
from __future__ import annotations

from collections import defaultdict

TAG_KEYS = ("model", "method")
LATENCY_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]


class Telemetry:
    def __init__(self) -> None:
        self._inflight: dict[tuple, int] = defaultdict(int)
        self.enabled = False
        try:
            import ray  # deferred: Ray loads only inside a Ray process (no metrics elsewhere)
            from ray.util.metrics import Counter, Gauge, Histogram

            if not ray.is_initialized():
                return
            self.done = Counter("cfaudit_queries_done", "queries explained and written", tag_keys=TAG_KEYS)
            self.failed = Counter("cfaudit_queries_failed", "queries of units that failed every retry",
                                  tag_keys=TAG_KEYS)
            self.latency = Histogram("cfaudit_unit_seconds", "wall time of one work unit",
                                     boundaries=LATENCY_BOUNDARIES, tag_keys=TAG_KEYS)
            self.inflight = Gauge("cfaudit_units_in_flight", "units being worked on", tag_keys=TAG_KEYS)
            self.enabled = True
        except Exception:  # metrics are an aid; never fail a job over them
            self.enabled = False

    def unit_done(self, tags: dict[str, str], rows: int, seconds: float) -> None:
        if self.enabled:
            if rows > 0:  # Counter.inc refuses 0
                self.done.inc(int(rows), tags=tags)
            self.latency.observe(float(seconds), tags=tags)

    def unit_failed(self, tags: dict[str, str], queries: int) -> None:
        if self.enabled and queries > 0:
            self.failed.inc(int(queries), tags=tags)

    def in_flight(self, tags: dict[str, str], change: int) -> None:
        key = (tags["model"], tags["method"])
        self._inflight[key] += change
        if self.enabled:
            self.inflight.set(self._inflight[key], tags=tags)

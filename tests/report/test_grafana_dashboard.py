"""The Grafana dashboard queries exactly the metrics the model hosts export."""
import json
import re
from pathlib import Path

from engine.runtime import telemetry

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana" / "cfaudit.json"
EXPORTED = {  # Ray's Prometheus names: `ray_` prefix; counters with `_total`, histograms with `_bucket`
    "ray_cfaudit_queries_done_total", "ray_cfaudit_queries_failed_total", "ray_cfaudit_unit_seconds_bucket",
    "ray_cfaudit_units_in_flight"}


def test_dashboard_is_importable_and_uses_the_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "cfaudit-engine" and len(dash["panels"]) == 4
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_cfaudit_\w+", e)}
    assert used == EXPORTED
    source = Path(telemetry.__file__).read_text()
    for name in ("cfaudit_queries_done", "cfaudit_queries_failed", "cfaudit_unit_seconds", "cfaudit_units_in_flight"):
        assert f'"{name}"' in source  # the metric the host creates under that name
    for panel in dash["panels"]:
        assert all(set(telemetry.TAG_KEYS) <= set(re.findall(r"(\w+)=~", t["expr"])) for t in panel["targets"])

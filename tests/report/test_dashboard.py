"""The self-contained HTML dashboard (issue #8) of a small audit written without Ray: two models x
(gradual construction, and an `exaggeration` shard built from it with progressive-series columns)."""
import base64
import io
import json
import re
import shutil
import subprocess
import tempfile

import pyarrow as pa
import pytest
import torch
from PIL import Image

from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.report.bias import write_reports
from engine.report.dashboard import render_dashboard
from engine.report.summary import write_summary
from engine.store.results import shard_uri, write_shard
from engine.store.uri import join, write_bytes_atomic
from tests.fixtures.zoo import SHAPES

N = 6
MODELS = ("bias0.0", "bias1.0")
METHODS = ("exaggeration", "gradual_construction")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _series_shard(table: pa.Table) -> pa.Table:
    """The same rows as if written by `exaggeration`: a 5-step series of desired / achieved outputs each."""
    n = table.num_rows
    desired = [[0.1, 0.3, 0.5, 0.7, 0.9] for _ in range(n)]
    achieved = [[min(1.0, d + 0.05 * (i % 3)) for d in row] for i, row in enumerate(desired)]
    table = table.set_column(table.schema.get_field_index("method"), "method", pa.array(["exaggeration"] * n))
    for name, values in (("desired", desired), ("achieved", achieved)):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), pa.array(values, pa.list_(pa.float32())))
    return table


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, fair_cnn, confounded_cnn, shapes_oracle, shapes_biased_train, shapes_test):
    out = str(tmp_path_factory.mktemp("audit"))
    options = MetricOptions(confounders=("marker",), deletion_steps=0)
    for model_id, handle in zip(MODELS, (fair_cnn, confounded_cnn)):
        bundle = ModelBundle(classifier=handle, oracle=shapes_oracle, reference=shapes_biased_train)
        meta = {"job": "t", "spec_hash": "h", "model_id": model_id, "method": "gradual_construction",
                "config_hash": "c", "unit_id": model_id}
        table = explain_unit(make_method("gradual_construction", {"sigma": 20}), bundle, shapes_test.x[:N],
                             torch.arange(N), shapes_test.y[:N], "flip", seed=0, meta=meta, metrics=options)
        write_shard(shard_uri(out, model_id, "gradual_construction", 0), table)
        write_shard(shard_uri(out, model_id, "exaggeration", 0), _series_shard(table))
    spec = {"name": "dash <test>", "dataset": {"name": "shapes", "options": {**SHAPES, "confounder": "marker"}},
            "queries": {"split": "test"}, "metrics": {"confidence": 0.95, "bootstrap_samples": 100}}
    write_bytes_atomic(join(out, "_job.json"), json.dumps({"spec": spec}).encode())
    summary = write_summary(out, 0.95, 100)
    reports = write_reports(out, summary=summary)
    path = render_dashboard(out, max_examples=4)
    return path, reports


def test_dashboard_is_self_contained_and_complete(dashboard):
    path, reports = dashboard
    assert path.endswith("dashboard/index.html")
    page = open(path, encoding="utf-8").read()
    assert "<script" not in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.I)
    assert "http://" not in page and "https://" not in page
    # The fleet table, most confounded first.
    table = re.search(r'<table id="fleet-table">(.*?)</table>', page, re.S).group(1)
    order = re.findall(r"<tr><td[^>]*>[^<]*</td><td>([^<]+)</td>", table)
    fleet = reports["fleet"]
    rates = dict(zip(fleet["model_id"], fleet["confounding_rate"]))
    assert sorted(order) == sorted(MODELS)
    assert [rates[m] for m in order] == sorted(rates.values(), reverse=True), (order, rates)
    # One grid per model x method; drivers per model; one compatibility plot; the escaped job name.
    grids = re.findall(r'<figure class="grid" data-model="([^"]+)" data-method="([^"]+)"', page)
    assert sorted(grids) == sorted((m, k) for m in MODELS for k in METHODS)
    assert page.count('class="drivers"') == len(MODELS)
    assert page.count('class="compat"') == 1 and "not stored" in page
    assert "dash &lt;test&gt;" in page and "dash <test>" not in page
    assert 'id="fid-table"' in page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == len(MODELS) * len(METHODS) + len(MODELS) + 1
    for uri in images:
        assert uri.startswith("data:image/png;base64,")
        data = base64.b64decode(uri.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        Image.open(io.BytesIO(data)).verify()


def _chromium(*args, timeout=60):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium not installed (Debian package `chromium`; make test installs it where apt is available)")
    with tempfile.TemporaryDirectory(prefix="cfaudit-chromium-") as profile:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def test_dashboard_renders_in_headless_chromium(dashboard, tmp_path):
    path, _ = dashboard
    url = f"file://{path}"
    shot = tmp_path / "shot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1400,2000", "--virtual-time-budget=5000",
                    "--enable-logging=stderr", "--v=0", url)
    assert shot.exists(), run.stderr[-3000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 2000)
    assert image.getextrema() != ((255, 255), (255, 255), (255, 255)), "blank screenshot"
    assert len(image.getcolors(maxcolors=1 << 20) or range(2)) > 1
    # Page errors reach stderr as `...:INFO:CONSOLE(line)] "message", source: ...` (and `Uncaught ...`).
    page_errors = [line for line in run.stderr.splitlines()
                   if "CONSOLE" in line or "Uncaught" in line or "Failed to load resource" in line]
    assert not page_errors, page_errors
    dom = _chromium("--dump-dom", "--virtual-time-budget=5000", url)
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert '<table id="fleet-table">' in dom.stdout
    assert dom.stdout.count("<img ") == len(MODELS) * len(METHODS) + len(MODELS) + 1

"""The self-contained HTML dashboard (issue #8) of a small audit written without Ray: two models x
(gradual construction, and `exaggeration` through a tiny explainer, whose results carry the series `path`)."""
import base64
import contextlib
import dataclasses
import io
import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from engine.data import dataset_fingerprint
from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.explainer_training import ExplainerConfig, get_or_train_explainer
from engine.models.handles import ModelBundle
from engine.report.bias import write_reports
from engine.report.dashboard import render_dashboard
from engine.report.summary import read_shard, write_summary
from engine.store.results import SCHEMA_VERSION, read_series, shard_uri
from engine.store.uri import join, write_bytes_atomic
from tests.fixtures.results import SPEC_HASH, commit_shard, images_parquet
from tests.fixtures.zoo import SHAPES

N = 6
TINY = ExplainerConfig(steps=3, batch_size=8, width=4, d_steps=1)
MODELS = ("bias0.0", "bias1.0")
METHODS = ("exaggeration", "gradual_construction")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _tiny_explainer(handle, data):
    """A working (not a good) explainer: the dashboard needs real series, not faithful ones."""
    subset = dataclasses.replace(data, x=data.x[:64], y=data.y[:64], attributes=data.attributes[:64])
    return get_or_train_explainer(handle.module, subset, dataset_fingerprint(subset), TINY, seed=0)[0]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, fair_cnn, confounded_cnn, shapes_oracle, shapes_train, shapes_biased_train,
              shapes_test):
    out = str(tmp_path_factory.mktemp("audit"))
    options = MetricOptions(confounders=("marker",), deletion_steps=0)
    for model_id, handle in zip(MODELS, (fair_cnn, confounded_cnn)):
        bundle = ModelBundle(classifier=handle, oracle=shapes_oracle, reference=shapes_biased_train)
        meta = {"job": "t", "spec_hash": "h", "model_id": model_id, "method": "gradual_construction",
                "config_hash": "c", "unit_id": model_id}
        table = explain_unit(make_method("gradual_construction", {"sigma": 20}), bundle, shapes_test.x[:N],
                             torch.arange(N), shapes_test.y[:N], "flip", seed=0, meta=meta, metrics=options)
        commit_shard(out, model_id, "gradual_construction", 0, table)
        bundle = ModelBundle(classifier=handle, oracle=shapes_oracle, explainer=_tiny_explainer(handle, shapes_train))
        table = explain_unit(make_method("exaggeration"), bundle, shapes_test.x[:N], torch.arange(N),
                             shapes_test.y[:N], "flip", seed=0, meta={**meta, "method": "exaggeration"},
                             metrics=options)
        commit_shard(out, model_id, "exaggeration", 0, table)
    spec = {"name": "dash <test>", "dataset": {"name": "shapes", "options": {**SHAPES, "confounder": "marker"}},
            "queries": {"split": "test"}, "metrics": {"confidence": 0.95, "bootstrap_samples": 100}}
    write_bytes_atomic(join(out, "_job.json"), json.dumps({"spec": spec, "spec_hash": SPEC_HASH}).encode())
    summary = write_summary(out, 0.95, 100)
    reports = write_reports(out, summary=summary)
    path = render_dashboard(out, max_examples=4)
    return path, reports, out


def test_dashboard_is_self_contained_and_complete(dashboard):
    path, reports, _ = dashboard
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
    assert page.count('class="compat"') == 1
    # Per model, one figure of exaggeration's progressive series: a row per query of the query and its 10 steps.
    series = re.findall(r'<figure class="series" data-model="([^"]+)" data-method="([^"]+)" data-steps="(\d+)">'
                        r'<img class="series" [^>]*src="([^"]+)"', page)
    assert sorted((m, k, int(s)) for m, k, s, _ in series) == [(m, "exaggeration", TINY.num_bins) for m in MODELS]
    section = page[page.index('id="compatibility"'):page.index('id="fid"')]
    assert section.index('class="compat"') < section.index('class="series"')
    for *_, uri in series:
        width, height = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size
        assert width > 2 * height, (width, height)  # 3 rows of 1 + 10 images
    assert "dash &lt;test&gt;" in page and "dash <test>" not in page
    assert 'id="fid-table"' in page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == len(MODELS) * len(METHODS) + 2 * len(MODELS) + 1
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
    path, _, _ = dashboard
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
    assert dom.stdout.count("<img ") == len(MODELS) * len(METHODS) + 2 * len(MODELS) + 1
    assert dom.stdout.count('<img class="series"') == len(MODELS)


def test_results_store_the_progressive_series(dashboard, fair_cnn, confounded_cnn, tmp_path):
    _, _, out = dashboard
    for model_id, handle in zip(MODELS, (fair_cnn, confounded_cnn)):
        table = pq.read_table(shard_uri(out, model_id, "exaggeration", 0))
        series = np.stack(read_series(table.column("path"), range(N)))
        assert series.shape == (N, TINY.num_bins, 3, 32, 32)
        with torch.no_grad():  # `achieved` is the model's output on the stored steps
            f = torch.softmax(handle.logits(torch.from_numpy(series).flatten(0, 1)), 1)[:, 1].view(N, -1)
        torch.testing.assert_close(f, torch.tensor(table.column("achieved").to_pylist()), atol=1e-5, rtol=0)
        x_cf = table.column("x_cf").combine_chunks().to_numpy_ndarray()
        assert all(any(np.array_equal(x, step) for step in s) for x, s in zip(x_cf, series))  # x_cf is a step
        gc = pq.read_table(shard_uri(out, model_id, "gradual_construction", 0), columns=["path"])
        assert gc.column("path").null_count == gc.num_rows  # a method without a series stores none
    # A shard of the previous results schema (no `path`) is refused by name, not misread.
    old = tmp_path / "part-00000.parquet"
    table = pq.read_table(shard_uri(out, MODELS[0], "exaggeration", 0)).drop_columns(["path"])
    pq.write_table(table.replace_schema_metadata({b"cfaudit.schema_version": b"3"}), old)
    with pytest.raises(ValueError, match=rf"part-00000.parquet: results schema version 3, this cfaudit reads "
                                         rf"version {SCHEMA_VERSION}"):
        read_shard(str(old))


# `$` in user names: matplotlib reads `$...$` as mathtext, where `$x^$` and `$\frac$` raise and `$\alpha$` turns
# into a Greek letter. Every name below must be drawn character for character.
DOLLAR_MODELS = ("a$b", "m$x^$")  # an odd number of `$`; mathtext that raises
DOLLAR_CLASSES = ["cat $\\frac$", "100$ & $\\alpha$"]  # raises; would be drawn "100 & α"
DOLLAR_ATTRIBUTE = "$a_$ marker"


@contextlib.contextmanager
def drawn_texts():
    """Every string Agg draws inside the block, with whether it was drawn as mathtext."""
    from unittest import mock

    from matplotlib.backends.backend_agg import RendererAgg

    drawn: list[tuple[str, bool]] = []
    draw_text = RendererAgg.draw_text

    def spy(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        drawn.append((s, ismath))
        return draw_text(self, gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    with mock.patch.object(RendererAgg, "draw_text", spy):
        yield drawn


@pytest.fixture(scope="module")
def dollar_dashboard(tmp_path_factory, fair_cnn, confounded_cnn, shapes_oracle, shapes_train, shapes_biased_train,
                     shapes_test):
    """Both methods' results for models, classes (the user's Parquet) and an oracle attribute named in mathtext;
    returns the page and every string the figures drew, with whether it was drawn as mathtext."""
    out = tmp_path_factory.mktemp("dollar")
    data = out / "images.parquet"
    images_parquet(data, shapes_test.x[:N], shapes_test.y[:N])
    oracle = dataclasses.replace(shapes_oracle, class_names=[DOLLAR_ATTRIBUTE if n == "marker" else n
                                                             for n in shapes_oracle.class_names])
    options = MetricOptions(confounders=(DOLLAR_ATTRIBUTE,), deletion_steps=0)
    for model_id, handle in zip(DOLLAR_MODELS, (fair_cnn, confounded_cnn)):
        meta = {"job": "t", "spec_hash": "h", "model_id": model_id, "method": "gradual_construction",
                "config_hash": "c", "unit_id": model_id}
        table = explain_unit(make_method("gradual_construction", {"sigma": 20}),
                             ModelBundle(classifier=handle, oracle=oracle, reference=shapes_biased_train),
                             shapes_test.x[:N], torch.arange(N),
                             shapes_test.y[:N], "flip", seed=0, meta=meta, metrics=options)
        commit_shard(str(out), model_id, "gradual_construction", 0, table)
        bundle = ModelBundle(classifier=handle, oracle=oracle, explainer=_tiny_explainer(handle, shapes_train))
        table = explain_unit(make_method("exaggeration"), bundle, shapes_test.x[:N], torch.arange(N),
                             shapes_test.y[:N], "flip", seed=0, meta={**meta, "method": "exaggeration"},
                             metrics=options)
        commit_shard(str(out), model_id, "exaggeration", 0, table)
    spec = {"name": "dollar", "dataset": {"name": "parquet_images", "options": {
        "path": str(data), "split_column": "split", "class_names": DOLLAR_CLASSES}},
        "queries": {"split": "test"}, "metrics": {"confidence": 0.95, "bootstrap_samples": 50,
                                                   "confounders": [DOLLAR_ATTRIBUTE]}}
    write_bytes_atomic(join(str(out), "_job.json"), json.dumps({"spec": spec, "spec_hash": SPEC_HASH}).encode())
    write_reports(str(out), summary=write_summary(str(out), 0.95, 50))
    with drawn_texts() as drawn:
        page = open(render_dashboard(str(out), max_examples=4), encoding="utf-8").read()
    return page, drawn


def test_dollar_signs_in_user_names_are_drawn_literally(dollar_dashboard):
    import html

    page, drawn = dollar_dashboard
    assert drawn and not [s for s, ismath in drawn if ismath]  # no figure text went through mathtext
    texts = [s for s, _ in drawn]
    for model in DOLLAR_MODELS:
        assert f"{model} / gradual_construction" in texts  # the grid's title
        assert f"{model}: attribute drivers" in texts
        assert f"{model} / exaggeration: progressive series" in texts
        assert any(s.startswith(f"{model} / exaggeration (MAE ") for s in texts)  # the compatibility legend
        assert f'data-model="{html.escape(model)}"' in page
    for name in DOLLAR_CLASSES:  # grid titles and the series' axis labels
        assert any(f": {name}" in s for s in texts), name
        assert any(f"→ {name}" in s for s in texts), name
    assert DOLLAR_ATTRIBUTE in texts  # a tick label of the drivers chart
    assert html.escape(DOLLAR_ATTRIBUTE) in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', page)
    assert len(images) == len(DOLLAR_MODELS) * len(METHODS) + 2 * len(DOLLAR_MODELS) + 1


def test_sweep_page_draws_knob_values_literally(tmp_path):
    """A categorical knob's values label the trade-off curve's x axis; `$` in them is text too."""
    import polars as pl

    from engine.report.sweep_page import render_sweep_page

    values = ["l1", "$x^$", "a$b"]
    spec = {"name": "s", "space": {"loss": {"choice": values}}, "objectives": [{"metric": "validity", "mode": "max"}]}
    write_bytes_atomic(join(str(tmp_path), "_sweep.json"), json.dumps({"spec": spec}).encode())
    pl.DataFrame({"trial_id": ["t0", "t1", "t2"], "status": ["TERMINATED"] * 3, "loss": values,
                  "validity": [0.5, 0.7, 0.9]}).write_parquet(tmp_path / "trials.parquet")
    with drawn_texts() as drawn:
        page = open(render_sweep_page(str(tmp_path)), encoding="utf-8").read()
    assert page.count('<figure class="tradeoff" data-knob="loss">') == 1
    assert {("$x^$", False), ("a$b", False)} <= set(drawn)  # tick labels, as given

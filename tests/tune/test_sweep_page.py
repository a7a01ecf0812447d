"""The sweep page renders from a sweep directory alone and escapes every user string."""
import json

import numpy as np
import polars as pl

from engine.report.sweep_page import render_sweep_page

EVIL = "<script>alert(1)</script>"


def write_sweep(directory, image: bool) -> None:
    """A sweep directory as engine.workflows.sweep writes it, by hand: three trials on one knob."""
    spec = {"name": "s" + EVIL, "seed": 0, "search": "grid", "dataset": {"name": "d" + EVIL},
            "fleet": [{"id": EVIL}], "method": {"name": "aip"}, "queries": {"count": 4},
            "space": {"alpha": {"grid": [0.5, 2.0, 8.0]}},
            "objectives": [{"metric": "flip_ratio", "mode": "max"}, {"metric": "mean_lpr", "mode": "min"}]}
    (directory / "_sweep.json").write_text(json.dumps({"name": spec["name"], "spec_hash": "x", "spec": spec}))
    trials = pl.DataFrame({"trial_id": ["t_00000", "t_00001", "t_00002"], "trial_index": [0, 1, 2],
                           "status": ["TERMINATED"] * 3, "error": [None, None, EVIL], "seed": [0, 0, 0],
                           "alpha": [0.5, 2.0, 8.0], "flip_ratio": [1.0, 0.9, 0.6], "validity": [1.0, 0.9, 0.6],
                           "mean_lpr": [0.8, 0.5, 0.45]})
    trials.write_parquet(directory / "trials.parquet")
    trials.with_columns(pl.lit(True).alias("on_front"), pl.Series("knee_score", [0.0, 0.2, 0.0]),
                        pl.Series("recommended", [False, True, False])).write_parquet(directory / "pareto.parquet")
    shape = [3, 8, 8] if image else [4]
    size = int(np.prod(shape))
    rows = []
    for point, trial in (("best flip_ratio", "t_00000"), ("recommended" + EVIL, "t_00001")):
        for q in range(2):
            rows.append({"point": point, "trial_id": trial, "config": json.dumps({"alpha": 2.0}), "model_id": EVIL,
                         "query_id": q, "label": 0, "pred_orig": 0, "target": 1, "pred_cf": 1, "success": True,
                         "l0": 1, "changes": [f"{EVIL}: 0.1 -> 0.9"], "x": [0.2] * size, "x_cf": [0.8] * size,
                         "shape": shape, "value_lo": 0.0, "value_hi": 1.0})
    pl.from_dicts(rows).write_parquet(directory / "examples.parquet")


def test_page_renders_every_section_and_escapes(tmp_path):
    write_sweep(tmp_path, image=True)
    uri = render_sweep_page(str(tmp_path))
    page = (tmp_path / "index.html").read_text()
    assert uri.endswith("index.html")
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    for section in ('id="recommendation"', 'id="tradeoffs"', 'id="front"', 'id="examples"', 'id="trials"',
                    'id="pareto-table"', 'data-knob="alpha"'):
        assert section in page
    assert page.count('class="example"') == 2 and page.count("data:image/png;base64,") >= 4
    assert "<b>alpha=2.000</b>" in page and "http" not in page  # self-contained, no external URL


def test_tabular_examples_list_the_changed_features(tmp_path):
    write_sweep(tmp_path, image=False)
    render_sweep_page(str(tmp_path))
    page = (tmp_path / "index.html").read_text()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;: 0.1 -&gt; 0.9" in page  # the changes column, escaped


def test_page_without_examples_or_front(tmp_path):
    write_sweep(tmp_path, image=True)
    (tmp_path / "examples.parquet").unlink()
    (tmp_path / "pareto.parquet").unlink()
    page = (tmp_path / render_sweep_page(str(tmp_path)).rsplit("/", 1)[-1]).read_text()
    assert "No recommendation" in page and "No examples stored" in page

"""The audit dashboard (issue #8): <out>/dashboard/index.html, one self-contained HTML file.

Read from <out>/reports (fleet, summary, attributes), <out>/results (counterfactuals, progressive-series
columns) and <out>/_job.json (the dataset, to reload the query images by query_id). Every image is an
inline base64 PNG data URI drawn with matplotlib (Agg); the page has no script and names no external URL.
Sections: the fleet table sorted by confounding rate; per model, one grid per method of query /
counterfactual / difference map (red: the counterfactual added intensity, blue: it removed some, as in
CDeepEx) and a bar chart of the attributes the counterfactuals moved; the desired-vs-achieved
compatibility plot of progressive-series methods (`exaggeration`) and, per model, their series images
(engine.report.dashboard_series); FID per method with its extractor.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

import numpy as np
import polars as pl
import pyarrow as pa

from engine.data.source import open_split
from engine.report.bias import read_report
from engine.report.dashboard_series import series_section
from engine.report.dashboard_text import text_table
from engine.report.html import CSS, esc, img, png, show, table
from engine.store.frames import read_columns, read_frame
from engine.store.results import result_files
from engine.store.uri import exists, join, read_bytes, write_bytes_atomic

SCALARS = ["query_id", "label", "pred_orig", "target", "pred_cf", "success", "oracle_changed", "changes",
           "text", "text_cf"]
# Every figure is drawn under these settings: model ids, class and attribute names are the user's and may hold
# `$`, which matplotlib otherwise reads as mathtext (`$x^$` raises, `$\alpha$` becomes α); here text is drawn
# as given. (No chart of the dashboard has a log axis, whose tick labels are mathtext.)
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False, "axes.formatter.use_mathtext": False}


def _read(out: str, name: str) -> Optional[pl.DataFrame]:
    uri = join(out, "reports", f"{name}.parquet")
    if not exists(uri):
        return None
    if name == "summary":  # versioned with the results schema, not the report schema
        return read_frame(uri)
    return read_report(uri)


def _job_spec(out: str) -> dict[str, Any]:
    uri = join(out, "_job.json")
    return json.loads(read_bytes(uri)).get("spec", {}) if exists(uri) else {}


class QueryImages:
    """The queries' split of the audit's dataset, read one shown query at a time (query_id indexes the split)."""

    def __init__(self, source) -> None:
        self.source, self.class_names = source, list(source.info.class_names)

    def image(self, query_id: int):
        """[C, H, W] (or [D]) tensor of one query."""
        return self.source.take([int(query_id)]).x[0]


def _queries(spec: dict[str, Any]):
    """QueryImages of the audit's query split, or (None, why not)."""
    dataset = spec.get("dataset") or {}
    if not dataset.get("name"):
        return None, "the audit's _job.json names no dataset"
    split = (spec.get("queries") or {}).get("split", "test")
    try:
        return QueryImages(open_split(dataset["name"], split, **(dataset.get("options") or {}))), ""
    except Exception as error:  # noqa: BLE001 - the page says why the queries are missing
        return None, f"could not reload {dataset['name']}/{split}: {error}"


def _shards(out: str) -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for uri in result_files(out):
        m = re.search(r"model=([^/]+)/method=([^/]+)/part-[^/]*\.parquet$", uri)
        if m:
            found.setdefault((m.group(1), m.group(2)), []).append(uri)
    return found


def _examples(uris: list[str], k: int) -> tuple[list[dict[str, Any]], Optional[np.ndarray]]:
    """Up to k rows (successful ones first, then by query id) and their counterfactuals [k, *shape]."""
    picked: list[tuple[dict[str, Any], np.ndarray]] = []
    for uri in uris:
        shard = read_columns(uri, SCALARS)
        rows = shard.to_pylist()
        order = sorted(range(len(rows)), key=lambda i: (not rows[i].get("success"), rows[i]["query_id"]))
        take = order[:k]
        if not take:
            continue
        x_cf = (read_columns(uri, ["x_cf"]).column("x_cf").combine_chunks().take(pa.array(take))
                .to_numpy_ndarray())
        picked += [(rows[i], x_cf[j]) for j, i in enumerate(take)]
        if sum(bool(r.get("success")) for r, _ in picked) >= k:
            break
    picked.sort(key=lambda p: (not p[0].get("success"), p[0]["query_id"]))
    picked = picked[:k]
    if not picked:
        return [], None
    return [r for r, _ in picked], np.stack([x for _, x in picked])


def _grid(rows: list[dict[str, Any]], x_cf: np.ndarray, queries, class_names: list[str],
          title: str) -> str:
    """Rows of query / counterfactual / difference map (red added, blue removed) as one PNG."""
    import matplotlib.pyplot as plt  # deferred: pyplot loads when a page is drawn, after matplotlib.use("Agg")

    images = x_cf.ndim == 4 and x_cf.shape[1] in (1, 3)
    value_range = tuple(getattr(queries, "value_range", (0.0, 1.0))) if queries is not None else (0.0, 1.0)
    have_x = queries is not None and images
    cols = 3 if have_x else 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.0 * cols, 2.0 * len(rows)), squeeze=False)

    def name(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    for i, row in enumerate(rows):
        ax = axes[i]
        cf = x_cf[i]
        if not images:  # tabular: the counterfactual's features as bars
            ax[0].bar(range(cf.size), cf.reshape(-1), color="#4477aa")
        else:
            if have_x:
                x = queries.image(int(row["query_id"])).numpy()
                ax[0].imshow(show(x, value_range), cmap="gray", vmin=0, vmax=1)
                ax[0].set_title(f"query {row['query_id']}: {name(row['pred_orig'])}", fontsize=8)
                diff = (cf - x).sum(axis=0) / ((value_range[1] - value_range[0]) or 1.0)
                m = float(np.abs(diff).max()) or 1.0
                ax[2].imshow(diff, cmap="bwr", vmin=-m, vmax=m)
                ax[2].set_title("difference (red +, blue −)", fontsize=8)
            ax[1 if have_x else 0].imshow(show(cf, value_range), cmap="gray", vmin=0, vmax=1)
        status = "valid" if row.get("success") else "not valid"
        ax[1 if have_x else 0].set_title(f"→ {name(row['target'])}: {name(row['pred_cf'])} ({status})", fontsize=8)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return png(fig)


def _grouped_bars(ax, groups: int, bars: dict[str, list[float]]) -> None:
    """One bar per label side by side within each of `groups` x positions."""
    width = 0.8 / max(len(bars), 1)
    for j, (label, values) in enumerate(bars.items()):
        ax.bar(np.arange(groups) + j * width - 0.4 + width / 2, values, width, label=label)


def _drivers(attributes: pl.DataFrame, model: str) -> Optional[str]:
    """Bar chart of how much each method's counterfactuals moved each attribute, for one model."""
    import matplotlib.pyplot as plt  # deferred: pyplot loads when a page is drawn, after matplotlib.use("Agg")

    part = attributes.filter(pl.col("model_id") == model)
    if part.is_empty():
        return None
    names = sorted(set(part["attribute"].to_list()))
    methods = sorted(set(part["method"].to_list()))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.0))
    bars = {}
    for method in methods:
        rows = {r["attribute"]: r for r in part.filter(pl.col("method") == method).iter_rows(named=True)}
        values = [rows[n]["movement"] if n in rows and rows[n]["movement"] is not None
                  and not math.isnan(rows[n]["movement"]) else 0.0 for n in names]
        by = next(iter(rows.values()))["ranked_by"] if rows else ""
        bars[f"{method} ({'mean |Δa|' if by == 'attribute_delta' else 'oracle change rate'})"] = values
    _grouped_bars(ax, len(names), bars)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("movement")
    ax.set_title(f"{model}: attribute drivers", fontsize=9)
    ax.legend(fontsize=7)
    return png(fig)


def _compatibility(series: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]) -> str:
    """Desired vs achieved classifier output of progressive series, all steps pooled, one colour per model."""
    import matplotlib.pyplot as plt  # deferred: pyplot loads when a page is drawn, after matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], color="#888", linestyle="--", linewidth=1, label="ideal")
    for (model, method), (desired, achieved) in sorted(series.items()):
        mae = float(np.mean(np.abs(desired - achieved))) if desired.size else float("nan")
        ax.scatter(desired, achieved, s=8, alpha=0.5, label=f"{model} / {method} (MAE {mae:.3f})")
    ax.set_xlabel("desired f(x) + δ")
    ax.set_ylabel("achieved f(x_δ)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("compatibility of progressive series", fontsize=9)
    ax.legend(fontsize=7)
    return png(fig)


def _series(uris: list[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    desired, achieved = [], []
    for uri in uris:
        shard = read_columns(uri, ["desired", "achieved"])
        if "desired" not in shard.column_names or "achieved" not in shard.column_names:
            continue
        for d, a in zip(shard.column("desired").to_pylist(), shard.column("achieved").to_pylist()):
            if d is not None and a is not None and len(d) == len(a):
                desired += d
                achieved += a
    if not desired:
        return None
    return np.asarray(desired, np.float64), np.asarray(achieved, np.float64)


def _fid_chart(summary: pl.DataFrame) -> Optional[str]:
    import matplotlib.pyplot as plt  # deferred: pyplot loads when a page is drawn, after matplotlib.use("Agg")

    part = summary.filter(pl.col("fid").is_not_null() & pl.col("fid").is_not_nan())
    if part.is_empty():
        return None
    models = sorted(set(part["model_id"].to_list()))
    methods = sorted(set(part["method"].to_list()))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(models) + 1.5), 3.0))
    bars = {}
    for method in methods:
        rows = {r["model_id"]: r for r in part.filter(pl.col("method") == method).iter_rows(named=True)}
        extractor = next((r["fid_extractor"] for r in rows.values() if r.get("fid_extractor")), "?")
        bars[f"{method} ({extractor})"] = [rows[m]["fid"] if m in rows else 0.0 for m in models]
    _grouped_bars(ax, len(models), bars)
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_ylabel("FID (lower: closer to real images)")
    ax.legend(fontsize=7)
    return png(fig)


def _changes_table(rows: list[dict[str, Any]], class_names: list[str], model: str, method: str) -> str:
    """Tabular counterfactuals as records: query, classes, validity and each changed feature (before -> after)."""
    def name(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    body = "".join(
        f"<tr><td>{esc(r['query_id'])}</td><td>{esc(name(r['pred_orig']))} → {esc(name(r['target']))}</td>"
        f"<td>{'valid' if r.get('success') else 'not valid'}</td>"
        f"<td>{'<br>'.join(esc(c) for c in (r.get('changes') or [])) or '(no change)'}</td></tr>" for r in rows)
    return (f"<figure class=\"records\" data-model=\"{esc(model)}\" data-method=\"{esc(method)}\">"
            f"<table><thead><tr><th>query</th><th>class</th><th>result</th><th>changes (before → after)</th></tr>"
            f"</thead><tbody>{body}</tbody></table><figcaption>{esc(method)}: counterfactual records</figcaption>"
            "</figure>")


def render_dashboard(out: str, max_examples: int = 6) -> str:
    """Write <out>/dashboard/index.html from the audit's reports and results; returns its path (URI)."""
    import matplotlib  # deferred: loads only when a page is drawn

    matplotlib.use("Agg", force=True)
    with matplotlib.rc_context(LITERAL_TEXT):
        return _write_page(out, max_examples)


def _write_page(out: str, max_examples: int) -> str:
    spec = _job_spec(out)
    fleet, summary, attributes = _read(out, "fleet"), _read(out, "summary"), _read(out, "attributes")
    shards = _shards(out)
    models = sorted({m for m, _ in shards})
    queries, why = _queries(spec)
    class_names = list(getattr(queries, "class_names", []) or [])
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{esc('cfaudit dashboard: ' + str(spec.get('name', out)))}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{esc('cfaudit audit ' + str(spec.get('name', '')))}</h1>",
             f"<p class=\"note\">Output {esc(out)}; dataset {esc((spec.get('dataset') or {}).get('name', '?'))}. "
             "This page is self-contained: every image is inline.</p>"]

    # The fleet, most confounded first.
    parts.append("<h2 id=\"fleet\">Fleet, sorted by confounding rate</h2>")
    if fleet is not None and fleet.height:
        fleet = fleet.sort(pl.col("confounding_rate").fill_nan(None), descending=True, nulls_last=True)
        models = [m for m in fleet["model_id"].to_list() if m in models] + [m for m in models
                                                                          if m not in fleet["model_id"].to_list()]
        columns = [c for c in ("rank", "model_id", "confounding_rate", "driver", "driver_rate",
                               "excludes_reference", "confounding_rate_by_method", "rank_by_method",
                               "flip_ratio", "driver_by_method") if c in fleet.columns]
        parts.append(table(fleet, columns, "fleet-table"))
        parts.append("<p class=\"note\">rank 1 = most confounded (rate pooled over methods); "
                     "flip_ratio = validity per method.</p>")
    else:
        parts.append("<p class=\"note\">No fleet report: run <code>cfaudit report</code>.</p>")

    # Per model: counterfactual grids and attribute drivers.
    if queries is None:
        parts.append(f"<p class=\"note\">Query images not shown: {esc(why)}.</p>")
    for model in models:
        parts.append(f"<h2 class=\"model\" id=\"model-{esc(model)}\">Model {esc(model)}</h2><div class=\"grids\">")
        for method in sorted(mm for m, mm in shards if m == model):
            rows, x_cf = _examples(shards[(model, method)], max_examples)
            if x_cf is None:
                continue
            if any(r.get("text_cf") is not None for r in rows):  # sentences (engine.report.dashboard_text)
                parts.append(text_table(rows, class_names, model, method))
                continue
            if any(r.get("changes") is not None for r in rows):  # tabular records: the changes in words
                parts.append(_changes_table(rows, class_names, model, method))
                continue
            uri = _grid(rows, x_cf, queries, class_names, f"{model} / {method}")
            caption = f"{method}: query, counterfactual, difference (red: added, blue: removed)"
            parts.append(f"<figure class=\"grid\" data-model=\"{esc(model)}\" data-method=\"{esc(method)}\">"
                         f"{img(uri, f'{model} {method} examples', 'grid')}"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        parts.append("</div>")
        chart = _drivers(attributes, model) if attributes is not None else None
        if chart:
            parts.append(f"<h3>Attribute drivers</h3><figure>{img(chart, f'{model} attribute drivers', 'drivers')}"
                         "</figure>")

    # Progressive series (exaggeration): compatibility of desired and achieved outputs, then the series.
    parts.append("<h2 id=\"compatibility\">Progressive series: compatibility and exaggeration</h2>")
    series = {key: s for key, uris in sorted(shards.items()) if (s := _series(uris)) is not None}
    if series:
        parts.append(f"<figure>{img(_compatibility(series), 'compatibility plot', 'compat')}</figure>")
        parts.append("<p class=\"note\">Every step of every query pooled per model.</p>")
        parts += series_section(shards, models, queries, class_names)
    else:
        parts.append("<p class=\"note\">No method in this audit produced progressive series "
                     "(<code>exaggeration</code> does).</p>")

    # Counterfactual augmentation (cfaudit augment --evaluate): test accuracy per arm over seeds.
    aug_uri = join(out, "reports", "augmentation.parquet")
    if exists(aug_uri):
        aug = read_frame(aug_uri)
        parts.append("<h2 id=\"augmentation\">Counterfactual augmentation</h2>")
        columns = [c for c in ("arm", "seeds", "n_initial", "n_added", "accuracy_mean", "accuracy_std",
                               "accuracy_min", "accuracy_max", "plausibility_filter", "plausibility_features")
                   if c in aug.columns]
        parts.append(table(aug, columns, "augmentation-table"))
        parts.append("<p class=\"note\">Test accuracy of the architecture trained from scratch on the initial set "
                     "(baseline), with the kept counterfactuals (one arm per method, label = target class), and "
                     "with as many real initial samples drawn again (duplicates: the same number of training "
                     "steps).</p>")

    # Fréchet distances, naming the extractor.
    parts.append("<h2 id=\"fid\">FID per method</h2>")
    if summary is not None and "fid" in summary.columns:
        columns = [c for c in ("model_id", "method", "fid", "fid_extractor", "fid_samples",
                               "fid_reference_samples") if c in summary.columns]
        parts.append(table(summary.sort(["method", "model_id"]), columns, "fid-table"))
        chart = _fid_chart(summary)
        if chart:
            parts.append(f"<figure>{img(chart, 'FID per method', 'fid')}</figure>")
        else:
            parts.append("<p class=\"note\">No FID computed in this audit (no reference statistics or no valid "
                         "counterfactuals).</p>")
    else:
        parts.append("<p class=\"note\">No summary report.</p>")
    parts.append("</body></html>")
    uri = join(out, "dashboard", "index.html")
    write_bytes_atomic(uri, "\n".join(parts).encode("utf-8"))
    return uri

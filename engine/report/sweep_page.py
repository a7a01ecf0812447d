"""The sweep page: <out>/sweeps/<name>/index.html, one self-contained HTML file (like the audit dashboard).

Read from the sweep directory alone (_sweep.json, trials.parquet, pareto.parquet, examples.parquet). Sections:
the recommendation; per swept knob, its trade-off curve against every objective; the objectives against each
other with the Pareto front highlighted; counterfactual examples at the front's two ends and at the
recommended trial (images: query and counterfactual thumbnails; tabular: the features that changed); every
trial's row. Images are inline base64 PNGs (matplotlib, Agg); every user string is HTML-escaped.
"""
from __future__ import annotations

import json
from itertools import combinations
from typing import Any, Optional

import numpy as np
import polars as pl

from engine.report.html import CSS, esc, fmt, img, png, show, table
from engine.store.frames import read_frame
from engine.store.uri import exists, join, read_bytes, write_bytes_atomic

GREY, FRONT, STAR = "#9a9a9a", "#c0392b", "#f1c40f"


def _read(uri: str) -> Optional[pl.DataFrame]:
    return read_frame(uri) if exists(uri) else None


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)


def _log_axis(entry: dict[str, Any], values: list[float]) -> bool:
    if entry.get("loguniform"):
        return True
    finite = [v for v in values if v is not None and v > 0]
    return len(finite) == len(values) and len(finite) > 1 and max(finite) / min(finite) >= 20


def _positions(values: list[Any], entry: dict[str, Any]) -> tuple[np.ndarray, Optional[list[str]], bool]:
    """x positions for knob values: numbers as they are, anything else by its order of first appearance."""
    if _numeric(values):
        return np.array([np.nan if v is None else float(v) for v in values]), None, _log_axis(entry, values)
    labels = list(dict.fromkeys(str(v) for v in values))
    return np.array([labels.index(str(v)) for v in values], dtype=float), labels, False


def _tradeoff(done: pl.DataFrame, knob: str, entry: dict[str, Any], objectives: list[dict[str, Any]],
              single: bool) -> str:
    """One panel per objective: the knob's value against the objective, front and recommendation marked."""
    import matplotlib.pyplot as plt  # deferred: pyplot loads when a page is drawn, after matplotlib.use("Agg")

    x, labels, log = _positions(done[knob].to_list(), entry)
    front = done["on_front"].to_numpy() if "on_front" in done.columns else np.zeros(done.height, bool)
    rec = done["recommended"].to_numpy() if "recommended" in done.columns else np.zeros(done.height, bool)
    fig, axes = plt.subplots(1, len(objectives), figsize=(3.6 * len(objectives), 3.0), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        y = done[objective["metric"]].cast(pl.Float64).to_numpy()
        if single:  # the only knob: the curve joins the trials in knob order
            order = np.argsort(x, kind="stable")
            ax.plot(x[order], y[order], color=GREY, linewidth=1, zorder=1)
        ax.scatter(x[~front], y[~front], color=GREY, s=18, zorder=2, label="trial")
        ax.scatter(x[front], y[front], color=FRONT, s=26, zorder=3, label="Pareto front")
        ax.scatter(x[rec], y[rec], color=STAR, edgecolor="black", marker="*", s=160, zorder=4, label="recommended")
        ax.set_xlabel(knob, parse_math=False)
        ax.set_ylabel(f"{objective['metric']} ({objective['mode']})", parse_math=False)
        if log:
            ax.set_xscale("log")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7, parse_math=False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"trade-off of {knob}", fontsize=9, parse_math=False)
    fig.tight_layout()
    return png(fig)


def _front_scatter(done: pl.DataFrame, a: dict[str, Any], b: dict[str, Any], knobs: list[str]) -> str:
    """Objective a against objective b; the front joined in order, each front point labelled by its config."""
    import matplotlib.pyplot as plt  # deferred: pyplot loads when a page is drawn, after matplotlib.use("Agg")

    x = done[a["metric"]].cast(pl.Float64).to_numpy()
    y = done[b["metric"]].cast(pl.Float64).to_numpy()
    front, rec = done["on_front"].to_numpy(), done["recommended"].to_numpy()
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    ax.scatter(x[~front], y[~front], color=GREY, s=18, label="dominated trial")
    order = np.flatnonzero(front)[np.argsort(x[front], kind="stable")]
    ax.plot(x[order], y[order], color=FRONT, linewidth=1.2, marker="o", markersize=5, label="Pareto front")
    ax.scatter(x[rec], y[rec], color=STAR, edgecolor="black", marker="*", s=200, zorder=4, label="recommended")
    for i in order:
        text = ", ".join(f"{k}={fmt(done[k][int(i)])}" for k in knobs)
        ax.annotate(text, (x[i], y[i]), fontsize=6, xytext=(3, 3), textcoords="offset points", parse_math=False)
    ax.set_xlabel(f"{a['metric']} ({a['mode']})", parse_math=False)
    ax.set_ylabel(f"{b['metric']} ({b['mode']})", parse_math=False)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def _thumbnails(part: pl.DataFrame, title: str) -> str:
    """Rows of query | counterfactual thumbnails for image examples."""
    import matplotlib.pyplot as plt  # deferred: pyplot loads when a page is drawn, after matplotlib.use("Agg")

    fig, axes = plt.subplots(part.height, 2, figsize=(3.4, 1.7 * part.height), squeeze=False)
    for ax, row in zip(axes, part.iter_rows(named=True)):
        shape = tuple(row["shape"])
        value_range = (row.get("value_lo", 0.0), row.get("value_hi", 1.0))
        for a, key in zip(ax, ("x", "x_cf")):
            a.imshow(show(np.asarray(row[key], np.float32).reshape(shape), value_range), cmap="gray", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
        ax[0].set_title(f"query {row['query_id']}: class {row['pred_orig']}", fontsize=7)
        ax[1].set_title(f"-> {row['target']}: {row['pred_cf']} ({'valid' if row['success'] else 'not valid'})",
                        fontsize=7)
    fig.suptitle(title, fontsize=8, parse_math=False)
    fig.tight_layout()
    return png(fig)


def _examples(examples: pl.DataFrame) -> list[str]:
    parts = ["<div class=\"grids\">"]
    for point in list(dict.fromkeys(examples["point"].to_list())):
        part = examples.filter(pl.col("point") == point).sort("query_id")
        first = part.row(0, named=True)
        config = ", ".join(f"{k}={fmt(v)}" for k, v in json.loads(first["config"]).items())
        caption = f"{point}: {config} (trial {first['trial_id']}, model {first['model_id']})"
        parts.append(f"<figure class=\"example\" data-point=\"{esc(point)}\">")
        if len(first["shape"]) >= 2:
            parts.append(img(_thumbnails(part, f"{point}: {config}"), f"{point} counterfactuals", "examples"))
        else:
            view = part.with_columns(pl.col("changes").list.join("; ").alias("changed features"),
                                     pl.col("success").alias("valid"))
            parts.append(table(view, ["query_id", "target", "pred_cf", "valid", "l0", "changed features"]))
        parts.append(f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</div>")
    return parts


def render_sweep_page(directory: str) -> str:
    """Write <directory>/index.html from the sweep's files; returns its URI."""
    import matplotlib  # deferred: loads only when a page is drawn

    matplotlib.use("Agg", force=True)
    record = json.loads(read_bytes(join(directory, "_sweep.json")))
    spec = record.get("spec", {})
    trials = _read(join(directory, "trials.parquet"))
    pareto = _read(join(directory, "pareto.parquet"))
    examples = _read(join(directory, "examples.parquet"))
    space: dict[str, Any] = spec.get("space") or {}
    knobs = list(space)
    objectives: list[dict[str, Any]] = list(spec.get("objectives") or [])
    method = (spec.get("method") or {}).get("name", "?")
    models = [m.get("id", "?") for m in spec.get("fleet") or []]
    name = str(spec.get("name", record.get("name", "")))
    wanted = ", ".join(f"{o.get('metric')} ({o.get('mode')})" for o in objectives)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{esc('cfaudit sweep: ' + name)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(f'cfaudit sweep {name}: {method}')}</h1>",
             f"<p class=\"note\">Models {esc(', '.join(models))}; dataset "
             f"{esc((spec.get('dataset') or {}).get('name', '?'))}; {esc((spec.get('queries') or {}).get('count', '?'))}"
             f" queries per trial (seed {esc(spec.get('seed', '?'))}); search {esc(spec.get('search', '?'))}; "
             f"objectives {esc(wanted)}. "
             "This page is self-contained: every image is inline.</p>"]
    done = None
    if trials is not None and trials.height and "status" in trials.columns:
        done = trials.filter(pl.col("status") == "TERMINATED")
        marks = pareto.select(["trial_id", "on_front", "recommended"]) if pareto is not None else None
        if marks is not None:
            done = done.join(marks, on="trial_id", how="left")
        else:
            done = done.with_columns(pl.lit(None, pl.Boolean).alias("on_front"), pl.lit(None, pl.Boolean).alias("recommended"))
        done = done.with_columns(pl.col("on_front").fill_null(False), pl.col("recommended").fill_null(False))

    parts.append("<h2 id=\"recommendation\">Recommendation</h2>")
    rec = None if pareto is None else pareto.filter(pl.col("recommended"))
    if rec is not None and rec.height:
        row = rec.row(0, named=True)
        config = ", ".join(f"{k}={fmt(row.get(k))}" for k in knobs)
        figures = ", ".join(f"{o['metric']} {fmt(row.get(o['metric']))}" for o in objectives)
        floor = spec.get("validity_floor")
        why = "the knee of the Pareto front" + (f" of the trials with validity ≥ {floor}" if floor is not None else "")
        parts.append(f"<p id=\"recommended\"><b>{esc(config)}</b>: {esc(figures)} ({esc(why)}; trial "
                     f"{esc(row['trial_id'])}).</p>")
    else:
        parts.append("<p class=\"note\">No recommendation: no finished trial"
                     + (" reaches the validity floor" if spec.get("validity_floor") is not None else "") + ".</p>")
    parts.append("<p class=\"note\">Knee: each objective min-max normalised over the front (0 best, 1 worst); the "
                 "knee is the front point farthest below the line (hyperplane) through the front's extremes.</p>")

    if done is not None and done.height:
        parts.append("<h2 id=\"tradeoffs\">Trade-off curves</h2>")
        for knob in knobs:
            uri = _tradeoff(done, knob, space.get(knob) or {}, objectives, single=len(knobs) == 1)
            parts.append(f"<figure class=\"tradeoff\" data-knob=\"{esc(knob)}\">{img(uri, f'{knob} trade-off', 'curve')}"
                         f"<figcaption>{esc(knob)} against every objective; red: Pareto front, star: recommended"
                         "</figcaption></figure>")
        parts.append("<h2 id=\"front\">Pareto front</h2>")
        if len(objectives) >= 2:
            for a, b in combinations(objectives, 2):
                uri = _front_scatter(done, a, b, knobs)
                alt = f"{a['metric']} vs {b['metric']}"
                parts.append(f"<figure class=\"front\">{img(uri, alt, 'front')}"
                             f"<figcaption>{esc(a['metric'])} against {esc(b['metric'])}</figcaption></figure>")
        else:
            parts.append("<p class=\"note\">One objective: the front is its best trial(s).</p>")
        if pareto is not None:
            columns = [c for c in ["trial_index", *knobs, *[o["metric"] for o in objectives], "validity",
                                   "knee_score", "recommended"] if c in pareto.columns]
            parts.append(table(pareto, list(dict.fromkeys(columns)), "pareto-table"))

    parts.append("<h2 id=\"examples\">Counterfactuals along the front</h2>")
    if examples is not None and examples.height:
        parts += _examples(examples)
    else:
        parts.append("<p class=\"note\">No examples stored (examples: 0, or no finished trial).</p>")

    parts.append("<h2 id=\"trials\">Every trial</h2>")
    if trials is not None and trials.height:
        columns = [c for c in ["trial_index", "trial_id", "status", *knobs, *[o["metric"] for o in objectives],
                               "validity", "seed", "error"] if c in trials.columns]
        parts.append(table(trials, list(dict.fromkeys(columns)), "trials-table"))
    else:
        parts.append("<p class=\"note\">No trials yet.</p>")
    parts.append("</body></html>")
    uri = join(directory, "index.html")
    write_bytes_atomic(uri, "\n".join(parts).encode("utf-8"))
    return uri


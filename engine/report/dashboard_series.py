"""The dashboard's progressive-series section (Progressive Exaggeration, Singla et al. 2020, Fig. 2-3).

A method that produces a series x_δ (`exaggeration`) stores it in the results column `path` with the
classifier's output at every step (`desired` = f(x) + δ, `achieved` = f(x_δ)). Per model and such method
this draws one PNG: a row per query (valid ones first) of the query followed by every step of its series,
each step titled with the desired output and with the achieved output printed under it.
"""
from __future__ import annotations

from typing import Any, Optional

from engine.report.html import esc, img, png, show
from engine.store.frames import read_columns
from engine.store.results import read_series

ROW_COLUMNS = ["query_id", "pred_orig", "target", "success", "desired", "achieved"]


def series_rows(uris: list[str], k: int) -> list[dict[str, Any]]:
    """Up to k rows that carry a series (valid ones first, then by query id), each with `path` [S, *shape]."""
    picked: list[dict[str, Any]] = []
    for uri in uris:
        table = read_columns(uri, ROW_COLUMNS + ["path"])
        if "path" not in table.column_names:  # a shard of results schema < 4
            continue
        rows = table.drop_columns(["path"]).to_pylist()
        have = table.column("path").is_valid().to_pylist()
        order = sorted((i for i in range(len(rows)) if have[i]),
                       key=lambda i: (not rows[i].get("success"), rows[i]["query_id"]))[:k]
        for i, path in zip(order, read_series(table.column("path"), order)):
            picked.append({**rows[i], "path": path})
    picked.sort(key=lambda r: (not r.get("success"), r["query_id"]))
    return picked[:k]


def _label(values: Optional[list], step: int) -> str:
    return f"{values[step]:.2f}" if values is not None and step < len(values) and values[step] is not None else "?"


def series_figure(rows: list[dict[str, Any]], queries, class_names: list[str], title: str) -> str:
    """Rows of query | x_δ step 1 … S as one PNG; desired f above each step, achieved f(x_δ) under it."""
    import matplotlib.pyplot as plt  # deferred: pyplot loads when a page is drawn, after matplotlib.use("Agg")

    value_range = tuple(getattr(queries, "value_range", (0.0, 1.0))) if queries is not None else (0.0, 1.0)
    steps = max(len(r["path"]) for r in rows)
    lead = 1 if queries is not None else 0
    fig, axes = plt.subplots(len(rows), lead + steps, figsize=(1.15 * (lead + steps), 1.75 * len(rows)),
                             squeeze=False)

    def name(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    for ax_row, row in zip(axes, rows):
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off")
        if lead:
            ax = ax_row[0]
            ax.axis("on")
            ax.imshow(show(queries.image(int(row["query_id"])).numpy(), value_range), cmap="gray", vmin=0, vmax=1)
            status = "valid" if row.get("success") else "not valid"
            ax.set_title(f"query {row['query_id']} ({status})", fontsize=7)
            ax.set_xlabel(f"{name(row['pred_orig'])} → {name(row['target'])}", fontsize=7)
        for s, image in enumerate(row["path"]):
            ax = ax_row[lead + s]
            ax.axis("on")
            ax.imshow(show(image, value_range), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"desired {_label(row.get('desired'), s)}", fontsize=7)
            ax.set_xlabel(f"f = {_label(row.get('achieved'), s)}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return png(fig)


def series_section(shards: dict[tuple[str, str], list[str]], models: list[str], queries, class_names: list[str],
                   k: int = 3) -> list[str]:
    """HTML parts: per model (in the given order) and series method, a figure of up to k queries' series."""
    parts: list[str] = []
    for model in models:
        for method in sorted(mm for m, mm in shards if m == model):
            rows = series_rows(shards[(model, method)], k)
            if not rows:
                continue
            uri = series_figure(rows, queries, class_names, f"{model} / {method}: progressive series")
            caption = (f"{model} / {method}: each row is a query followed by its series x_δ; above each step the "
                       "desired output f(x) + δ, under it the achieved output f(x_δ) of the model (f: the "
                       "probability of the explainer's positive class)")
            parts.append(f"<h3>{esc(model)}</h3><figure class=\"series\" data-model=\"{esc(model)}\" "
                         f"data-method=\"{esc(method)}\" data-steps=\"{max(len(r['path']) for r in rows)}\">"
                         f"{img(uri, f'{model} {method} progressive series', 'series')}"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    return parts

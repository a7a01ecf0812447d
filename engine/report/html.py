"""What every self-contained page of cfaudit (the audit dashboard, the sweep page) is drawn with: the stylesheet,
escaping and number formatting, matplotlib figures as inline PNG data URIs, tables, and image scaling."""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
import polars as pl

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d1d1f;
background:#fff;max-width:1300px}
h1{font-size:24px}h2{font-size:20px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:16px;margin-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:13px}.grids{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0}figcaption{font-size:13px;color:#333}img{max-width:100%;height:auto}
"""


def esc(value: Any) -> str:
    """`value` as text safe inside HTML and attribute values."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A cell's value in words: – for none or NaN, yes/no, floats to 3 decimals, dicts as `k: v; ...`."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.3f}")
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def png(fig) -> str:
    """A matplotlib figure as a data URI (the figure is closed)."""
    import matplotlib.pyplot as plt  # deferred: matplotlib loads only when a page is drawn

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def img(uri: str, alt: str, kind: str) -> str:
    return f'<img class="{kind}" alt="{esc(alt)}" src="{uri}">'


def table(frame: pl.DataFrame, columns: list[str], table_id: str = "") -> str:
    """An HTML table of `columns` of `frame`; numbers right-aligned."""
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in frame.iter_rows(named=True):
        cells = []
        for c in columns:
            v = row.get(c)
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def show(x: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """[C, H, W] in value_range -> an image for imshow ([H, W] grey or [H, W, 3]) in [0, 1]."""
    lo, hi = value_range
    image = np.clip((x - lo) / ((hi - lo) or 1.0), 0.0, 1.0)
    return image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)

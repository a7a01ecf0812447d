"""The dashboard's text counterfactuals: each query's sentence and its counterfactual, changed words marked.

Rows carry `text` and `text_cf` (words separated by single spaces, engine.data.vocab). The two word lists
are aligned with difflib, so a substitution (Gradual Construction) marks one word on each side and a
rewritten sentence (AIP's decoded latent) marks only what differs. Removed words are struck through in
red on the query's side, inserted ones green on the counterfactual's; the page stays script-free.
"""
from __future__ import annotations

import difflib
from typing import Any

from engine.report.html import esc

CSS = ("mark.del{background:#fdd;color:#a00;text-decoration:line-through}"
       "mark.ins{background:#dfd;color:#060;font-weight:600}td.sentence{max-width:520px}")


def highlight(before: str, after: str) -> tuple[str, str]:
    """HTML of both sentences with the words difflib finds changed wrapped in <mark class="del|ins">."""
    a, b = before.split(), after.split()
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        old, new = " ".join(map(esc, a[i1:i2])), " ".join(map(esc, b[j1:j2]))
        if op == "equal":
            left.append(old)
            right.append(new)
            continue
        if old:
            left.append(f'<mark class="del">{old}</mark>')
        if new:
            right.append(f'<mark class="ins">{new}</mark>')
    return " ".join(left), " ".join(right)


def text_table(rows: list[dict[str, Any]], class_names: list[str], model: str, method: str) -> str:
    """A figure holding one table row per query: id, classes, validity, query and counterfactual sentences."""
    def name(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    body = []
    for r in rows:
        before, after = highlight(r.get("text") or "", r.get("text_cf") or "")
        body.append(f"<tr><td>{esc(r['query_id'])}</td><td>{esc(name(r['pred_orig']))} → "
                    f"{esc(name(r['target']))}</td><td>{'valid' if r.get('success') else 'not valid'}</td>"
                    f"<td class=\"sentence\">{before}</td><td class=\"sentence\">{after}</td></tr>")
    return (f"<figure class=\"sentences\" data-model=\"{esc(model)}\" data-method=\"{esc(method)}\">"
            f"<style>{CSS}</style><table><thead><tr><th>query</th><th>class</th><th>result</th><th>sentence</th>"
            f"<th>counterfactual (changed words marked)</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<figcaption>{esc(method)}: counterfactual sentences</figcaption></figure>")

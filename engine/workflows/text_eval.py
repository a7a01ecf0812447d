"""The text figures (issue 13): Gradual Construction on held-out sentences, its Eq. 12 ablation, and AIP.

`text_figures(spec)` trains (or takes from the model cache) the spec's CNN and text VAE exactly as
`cfaudit audit` does (engine.runtime.fleet), explains the spec's held-out queries with the same code path as a
work unit (engine.explain.explain_unit, no Ray) and returns:
  accuracy          the classifier's accuracy on the whole held-out split
  gc / gc_eq12      flip ratio, mean words changed over valid counterfactuals, and the share of inserted words
                    with the target's VADER polarity (engine.metrics.polarity) beside chance (a uniform draw from
                    the substitution candidates), for Eq. 7 and for Eq. 12 (`loss: target_probability`)
  aip               flip ratio (AIP Eq. 7) and LPR (Eq. 8) with k = latent size: ‖E_z(x_cf) − E_z(x)‖₀ / k over
                    the encoder's z (tolerance `metrics.lpr_tolerance`), and the results column `lpr` (z ⊕ a)
                    and two measures of how much of the query survives: `reconstruction` (greedy decoding of E(x)
                    gives the query's word at its position, over the queries' words) and `kept` (the same share
                    for the valid counterfactuals themselves)
  examples          a few (query, counterfactual) sentence pairs per method
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import polars as pl
import torch

from engine.data import load_dataset
from engine.explain import explain_unit
from engine.methods import config_hash, make_method
from engine.metrics.per_query import MetricOptions
from engine.metrics.polarity import chance_rate, polarity_rate, vader_lexicon
from engine.models.handles import ModelBundle
from engine.runtime.fleet import resolve_classifier, resolve_generator
from engine.runtime.plan import select_queries
from engine.spec.audit import AuditSpec


def inserted_words(frame: pl.DataFrame) -> list[tuple[str, int]]:
    """(inserted word, target sign) for every position where a valid counterfactual's word differs; sign +1
    for the binary task's second class (e.g. "fresh"), −1 for the first. Sentences are space-separated words
    and a substitution keeps positions, so position i of `text` and `text_cf` are the same slot."""
    out = []
    for row in frame.filter(pl.col("success")).iter_rows(named=True):
        sign = 1 if row["target"] == 1 else -1
        out += [(b, sign) for a, b in zip(row["text"].split(), row["text_cf"].split()) if a != b]
    return out


def _run(method_name: str, params: dict, bundle: ModelBundle, data, ids: torch.Tensor, spec: AuditSpec,
         metrics: MetricOptions) -> tuple[pl.DataFrame, float]:
    method = make_method(method_name, params)
    tables, start = [], time.process_time()
    for part, i in enumerate(range(0, len(ids), spec.runtime.batch_size)):
        chunk = ids[i:i + spec.runtime.batch_size]
        meta = {"job": spec.name, "spec_hash": spec.spec_hash(), "model_id": bundle.classifier.model_id,
                "method": method_name, "config_hash": config_hash(method_name, method.config),
                "unit_id": f"text_eval/{method_name}/{part:05d}"}
        table = explain_unit(method, bundle, data.x[chunk], chunk, data.y[chunk], spec.targets, spec.seed, meta,
                             metrics)
        tables.append(pl.from_arrow(table.drop_columns([c for c in ("x_cf", "path") if c in table.column_names])))
    return pl.concat(tables, how="diagonal_relaxed"), time.process_time() - start


def gc_figures(frame: pl.DataFrame, candidates: list[str], lexicon: dict[str, float]) -> dict[str, Any]:
    valid = frame.filter(pl.col("success"))
    inserted = inserted_words(frame)
    signs = [1 if t == 1 else -1 for t in valid["target"].to_list()]
    return {"queries": frame.height, "flip_ratio": valid.height / max(frame.height, 1),
            "words_changed": float(valid["l0"].mean()) if valid.height else float("nan"),
            "words_changed_max": int(valid["l0"].max()) if valid.height else 0,
            "inserted": len(inserted), "polarity_rate": polarity_rate(inserted, lexicon),
            "polarity_chance": chance_rate(candidates, signs, lexicon)}


def _latent_lpr(bundle: ModelBundle, data, frame: pl.DataFrame, tolerance: float) -> float:
    """Mean over valid rows of ‖E_z(x_cf) − E_z(x)‖₀ / k, k = the latent size (AIP Eq. 8), x_cf re-encoded
    from its words."""
    valid = frame.filter(pl.col("success"))
    if not valid.height:
        return float("nan")
    vocab, gen = data.schema, bundle.generator
    sentences = [s.split() for s in valid["text_cf"].to_list()]
    x_cf = vocab.embed(vocab.encode(sentences)).to(bundle.device)
    x = data.x[torch.tensor(valid["query_id"].to_list())].to(bundle.device)
    with torch.no_grad():
        z0, z1 = gen.encode(x)[0], gen.encode(x_cf)[0]
    return float(((z1 - z0).abs() > tolerance).float().mean(1).mean())


def positional_match(queries: list[list[str]], others: list[list[str]]) -> float:
    """Share of the queries' words that the other sentence has at the same position (0 when there are none)."""
    total = sum(len(q) for q in queries)
    same = sum(sum(a == b for a, b in zip(q, o)) for q, o in zip(queries, others))
    return same / total if total else 0.0


def _reconstruction(bundle: ModelBundle, data, ids: torch.Tensor) -> float:
    """positional_match of the queries and the generator's greedy decoding of their codes, G(E(x))."""
    x = data.x[ids].to(bundle.device)
    with torch.no_grad():
        decoded = bundle.generator.decode(*bundle.generator.encode(x))
    return positional_match(data.schema.tokens(x), data.schema.tokens(decoded))


def text_figures(spec: AuditSpec, gc_queries: Optional[int] = None, aip_queries: Optional[int] = None,
                 examples: int = 5, log: Callable[[str], None] = print) -> dict[str, Any]:
    if spec.dataset.name != "text":
        raise ValueError(f"text_figures: the spec's dataset must be 'text', got {spec.dataset.name!r}")
    torch.set_num_threads(1)
    cache = spec.runtime.cache_dir
    test = load_dataset("text", spec.queries.split, **spec.dataset.options)
    train = load_dataset("text", "train", **spec.dataset.options)
    handle = resolve_classifier(spec.fleet[0], spec.dataset, cache, log=log)
    generator = None if spec.generator is None else resolve_generator(spec.generator, spec.dataset, cache, log=log)
    with torch.no_grad():
        pred = torch.cat([handle.logits(test.x[i:i + 512]).argmax(1) for i in range(0, len(test), 512)])
    out: dict[str, Any] = {"accuracy": float((pred == test.y).float().mean()), "test_sentences": len(test)}
    log(f"  classifier {handle.model_id}: accuracy {out['accuracy']:.3f} on {len(test)} held-out sentences")
    bundle = ModelBundle(classifier=handle, generator=generator, reference=train)
    metrics = MetricOptions.from_spec(spec.metrics, [])
    lexicon, vocab = vader_lexicon(), train.schema
    candidates = vocab.words[1:vocab.candidates + 1]
    params = {m.name: dict(m.params) for m in spec.methods}
    ids = select_queries(test, gc_queries or spec.queries.count, spec.queries.seed, spec.queries.classes)
    for key, extra in (("gc", {}), ("gc_eq12", {"loss": "target_probability"})):
        frame, cpu = _run("gradual_construction", {**params.get("gradual_construction", {}), **extra}, bundle,
                          test, ids, spec, metrics)
        out[key] = {**gc_figures(frame, candidates, lexicon), "cpu_seconds": cpu}
        out[f"{key}_examples"] = _examples(frame, examples)
        log(f"  {key}: {out[key]}")
    if generator is not None and "aip" in params:
        ids = select_queries(test, aip_queries or spec.queries.count, spec.queries.seed, spec.queries.classes)
        frame, cpu = _run("aip", params["aip"], bundle, test, ids, spec, metrics)
        valid = frame.filter(pl.col("success"))
        out["aip"] = {"queries": frame.height, "flip_ratio": valid.height / max(frame.height, 1),
                      "lpr_z": _latent_lpr(bundle, test, frame, spec.metrics.lpr_tolerance),
                      "lpr_column": float(valid["lpr"].mean()) if valid.height else float("nan"),
                      "latent_size": int(generator.latent_dim), "cpu_seconds": cpu,
                      "reconstruction": _reconstruction(bundle, test, ids),
                      "kept": positional_match([t.split() for t in valid["text"].to_list()],
                                               [t.split() for t in valid["text_cf"].to_list()])}
        out["aip_examples"] = _examples(frame, examples)
        log(f"  aip: {out['aip']}")
    return out


def _examples(frame: pl.DataFrame, k: int) -> list[dict[str, Any]]:
    rows = frame.sort(["success", "query_id"], descending=[True, False]).head(k)
    return [{"query_id": r["query_id"], "target": r["target"], "success": r["success"], "text": r["text"],
             "text_cf": r["text_cf"], "changes": list(r["changes"] or [])} for r in rows.iter_rows(named=True)]


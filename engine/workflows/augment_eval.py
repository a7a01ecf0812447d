"""Does counterfactual augmentation help? AIP §4.6.2 / Table 5's protocol, per seed:

1. draw a small initial training set (`per_class` samples of every class);
2. train the fleet's first architecture from scratch on it and measure test accuracy (arm "baseline");
3. with that model, explain queries drawn from the initial set with each spec method, keep the valid and
   plausible counterfactuals (engine.workflows.augment's filter, its class references drawn from the
   initial set only) until `extra_fraction` of the initial set is reached, labelled with their target;
4. train the same architecture from scratch on initial + kept and measure test accuracy (arm = method);
5. control arm "duplicates": initial + as many real initial samples drawn again (same training steps as
   the largest method arm), so a gain from merely training on more rows is not credited to counterfactuals.

Runs in-process with the same library code as the Ray job (method, filter, training); reports mean ± std
over seeds to <out>/reports/augmentation.parquet (and every run to augmentation_runs.parquet).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import polars as pl
import torch

from engine.data import dataset_fingerprint, load_dataset
from engine.data.augmented import concat
from engine.data.base import ArrayDataset
from engine.explain import build_queries, bundle_for
from engine.methods import make_method
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.models.zoo import get_or_train
from engine.report.dashboard import render_dashboard
from engine.runtime.host import pick_device
from engine.spec.augment import AugmentSpec
from engine.store.frames import write_frame
from engine.store.uri import join
from engine.workflows.augment import feature_function, fit_plausibility


def initial_set(train: ArrayDataset, per_class: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in range(train.num_classes):
        idx = (train.y == c).nonzero().squeeze(1)
        if len(idx) < per_class:
            raise ValueError(f"augment.evaluation.per_class: class {c} ({train.class_names[c]}) of {train.name} "
                             f"has only {len(idx)} training samples, {per_class} requested")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return train.subset(torch.cat(picked).sort().values)


def accuracy(module: torch.nn.Module, data: ArrayDataset) -> float:
    with torch.no_grad():
        pred = torch.cat([module(data.x[i:i + 1024]).argmax(1) for i in range(0, len(data), 1024)])
    return float((pred == data.y).float().mean())


def generate(method_name: str, params: dict, handle: ClassifierHandle, initial: ArrayDataset, needed: int,
             candidates: int, spec: AugmentSpec, plausibility, features, seed: int) -> tuple[ArrayDataset, dict]:
    """Up to `needed` valid, plausible counterfactuals of queries drawn from the initial set."""
    g = torch.Generator().manual_seed(int(seed) + 1)
    order = torch.randperm(len(initial), generator=g)[:candidates].sort().values
    method = make_method(method_name, params)
    bundle = bundle_for(method, ModelBundle(classifier=handle, reference=initial))
    batch, _ = build_queries(bundle, initial.x[order], order, initial.y[order], spec.targets, spec.seed)
    cf = method.explain(batch, bundle)
    pred = cf.p_orig.argmax(1)
    valid = cf.success & (cf.target != pred) & torch.tensor([s == "ok" for s in cf.status])
    kept = valid.clone()
    if plausibility is not None and bool(valid.any()):
        rows = valid.nonzero().squeeze(1)
        with torch.no_grad():
            _, ok = plausibility.score(features(cf.x_cf[rows]).cpu(), cf.target[rows])
        kept[rows] = ok
    take = kept.nonzero().squeeze(1)[:needed]
    extra = ArrayDataset(name=f"cf:{method_name}", x=cf.x_cf[take].detach().float(), y=cf.target[take].clone(),
                         class_names=list(initial.class_names), kind=initial.kind, value_range=initial.value_range)
    return extra, {"queries": len(order), "valid": int(valid.sum()), "plausible": int(kept.sum()),
                   "added": len(take)}


def evaluate(spec: AugmentSpec, log: Callable[[str], Any] = print,
             summary: Optional[Callable[[str], Any]] = None) -> pl.DataFrame:
    """Run the protocol over every seed and method; returns the per-arm summary (also written). `summary`
    (default: `log`) gets the closing table and the dashboard's path."""
    closing = summary or log

    ev = spec.augment.evaluation
    arch, arch_options, train_kwargs = spec.evaluation_arch()
    train = load_dataset(spec.dataset.name, "train", **spec.dataset.options)
    test = load_dataset(spec.dataset.name, "test", **spec.dataset.options)
    features, feature_name = feature_function(train, spec, pick_device("cpu"), log)
    runs = []
    for seed in ev.seeds:
        start = time.perf_counter()
        initial = initial_set(train, ev.per_class, seed)
        needed = max(1, round(ev.extra_fraction * len(initial)))
        candidates = min(len(initial), math.ceil(ev.candidates * needed))
        module, _ = get_or_train("classifier", arch, arch_options, initial, dataset_fingerprint(initial),
                                 train_kwargs, seed, spec.runtime.cache_dir, log=log, stage=f"seed {seed} baseline")
        base_acc = accuracy(module, test)
        runs.append({"seed": seed, "arm": "baseline", "n_initial": len(initial), "n_added": 0,
                     "accuracy": base_acc, "queries": 0, "valid": 0, "plausible": 0})
        handle = ClassifierHandle(module, f"initial-seed{seed}", tuple(train.input_shape), list(train.class_names),
                                  tuple(train.value_range))
        for p in module.parameters():
            p.requires_grad_(False)
        plausibility = fit_plausibility(spec.augment.plausibility, initial, features, seed)
        for entry in spec.methods:
            extra, counts = generate(entry.name, entry.params, handle, initial, needed, candidates, spec,
                                     plausibility, features, seed)
            augmented = concat(initial, extra)
            aug_module, _ = get_or_train("classifier", arch, arch_options, augmented, dataset_fingerprint(augmented),
                                         train_kwargs, seed, spec.runtime.cache_dir, log=log,
                                         stage=f"seed {seed} {entry.name}")
            acc = accuracy(aug_module, test)
            runs.append({"seed": seed, "arm": entry.name, "n_initial": len(initial), "n_added": counts["added"],
                         "accuracy": acc, **{k: counts[k] for k in ("queries", "valid", "plausible")}})
            log(f"  seed {seed} {entry.name}: +{counts['added']} samples ({counts['valid']} valid, "
                f"{counts['plausible']} plausible of {counts['queries']} queries): accuracy {acc:.4f} "
                f"vs baseline {base_acc:.4f}")
        added = max([r["n_added"] for r in runs if r["seed"] == seed], default=0)
        if added:
            g = torch.Generator().manual_seed(int(seed) + 2)
            again = initial.subset(torch.randperm(len(initial), generator=g)[:added])
            control = concat(initial, again)
            ctl_module, _ = get_or_train("classifier", arch, arch_options, control, dataset_fingerprint(control),
                                         train_kwargs, seed, spec.runtime.cache_dir, log=log,
                                         stage=f"seed {seed} duplicates")
            runs.append({"seed": seed, "arm": "duplicates", "n_initial": len(initial), "n_added": added,
                         "accuracy": accuracy(ctl_module, test), "queries": 0, "valid": 0, "plausible": 0})
            log(f"  seed {seed} duplicates: +{added} real samples again: accuracy {runs[-1]['accuracy']:.4f}")
        log(f"  seed {seed} done in {time.perf_counter() - start:.1f}s")
    frame = pl.DataFrame(runs)
    summary = (frame.group_by("arm", maintain_order=True)
               .agg(pl.col("accuracy").mean().alias("accuracy_mean"), pl.col("accuracy").std().alias("accuracy_std"),
                    pl.len().alias("seeds"), pl.col("n_initial").first(), pl.col("n_added").mean().alias("n_added"),
                    pl.col("accuracy").min().alias("accuracy_min"), pl.col("accuracy").max().alias("accuracy_max"))
               .with_columns(pl.lit(spec.dataset.name).alias("dataset"), pl.lit(arch).alias("arch"),
                             pl.lit(feature_name).alias("plausibility_features"),
                             pl.lit(spec.augment.plausibility.filter).alias("plausibility_filter")))
    for name, table in (("augmentation", summary), ("augmentation_runs", frame)):
        write_frame(join(spec.output, "reports", f"{name}.parquet"), table)
    with pl.Config(tbl_rows=50, float_precision=4):
        closing(str(summary.select("arm", "seeds", "n_initial", "n_added", "accuracy_mean", "accuracy_std")))
    try:
        closing(f"dashboard: {render_dashboard(spec.output)}")
    except Exception as err:  # the reports are written; a page that fails loses nothing
        closing(f"dashboard: not rendered ({type(err).__name__}: {err})")
    return summary


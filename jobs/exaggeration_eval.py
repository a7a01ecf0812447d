"""Progressive Exaggeration on `shapes`: compatibility, δ = 0 reconstruction and bias detection (Table 3).

    python -m jobs.exaggeration_eval [--steps 800] [--queries 200] [--cache DIR]

Trains (or takes from the model cache) two CNNs on `shapes`, one with `marker` planted at bias 1.0 and one
without, an attribute oracle, and one explainer per classifier on the unbiased train split; then explains
held-out test queries (target: the other class) and prints for each classifier:
  spearman    Spearman correlation between desired f(x) + δ and achieved f(x_δ), pooled over queries x steps
  rec_l1      mean |x − I_f(x, 0)| per pixel (δ = 0 reconstruction), beside the data's per-pixel noise and the
              mean L1 from each query to its nearest other test image; rec_oracle_agreement: the fraction of
              reconstructions on which the oracle reads all six attributes as on the query
  confounding fraction of end points whose `marker`, as the oracle reads it, differs from the query's
The fixtures are those of tests/fixtures/zoo.py (same data options and training arguments), so the test
suite and this job share cached classifiers.
"""
from __future__ import annotations

import argparse
import time

import torch

from engine.data import dataset_fingerprint, load_dataset
from engine.models.explainer_training import (bin_index, classifier_positive_probs, get_or_train_explainer,
                                              make_explainer_config)
from engine.models.handles import ModelBundle
from engine.models.loading import classifier_handle_from_module
from engine.models.zoo import get_or_train
from engine.types import QueryBatch

SHAPES = {"size": 32, "n_train": 2000, "n_test": 400, "seed": 11}
CLASSIFIERS = {"biased": ({"bias": 1.0}, {"epochs": 2}), "fair": ({}, {"epochs": 4, "batch_size": 32})}
# The full-size explainer: ExplainerConfig fields that differ from the paper's defaults (CPU budget; see README).
FULL = {"steps": 1500, "batch_size": 32, "d_steps": 1, "width": 16, "levels": 1, "skip": True, "lr": 1e-3,
        "lambda_rec": 10.0}


def spearman(desired: torch.Tensor, achieved: torch.Tensor) -> float:
    """Spearman's ρ over all (query, step) pairs (ties get average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(desired.flatten().numpy(), achieved.flatten().numpy()).statistic)


def spearman_per_query(desired: torch.Tensor, achieved: torch.Tensor) -> float:
    """Mean over queries of Spearman's ρ across each query's own series (queries with a constant series skipped)."""
    from scipy.stats import spearmanr

    values = [spearmanr(d.numpy(), a.numpy()).statistic for d, a in zip(desired, achieved)
              if a.max() > a.min()]
    return float(torch.tensor(values, dtype=torch.float64).nanmean()) if values else float("nan")


@torch.no_grad()
def reconstruction_l1(explainer, classifier, x: torch.Tensor) -> torch.Tensor:
    """Per-query mean |x − G(E(x), c_f(x, 0))| over pixels [B] (Eq. 5 at inference)."""
    f0 = classifier_positive_probs(classifier, x, explainer.positive_class)
    return (explainer(x, bin_index(f0, explainer.num_bins)) - x).abs().flatten(1).mean(1)


@torch.no_grad()
def confounding_rate(oracle, x: torch.Tensor, x_cf: torch.Tensor, attribute: int) -> float:
    """Table 3's 'overall': the fraction of end points whose attribute, as the oracle reads it, differs."""
    return ((oracle(x)[:, attribute] > 0) != (oracle(x_cf)[:, attribute] > 0)).float().mean().item()


def nearest_other_l1(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean-per-pixel L1 to the nearest other image of `x` [B]."""
    flat = x.flatten(1)
    d = torch.cdist(flat, flat, p=1) / flat.shape[1]
    d.fill_diagonal_(float("inf"))
    return d.min(1).values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override an ExplainerConfig field of the full-size config {FULL}")
    parser.add_argument("--only", choices=sorted(CLASSIFIERS), action="append", help="evaluate only these")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--cache", default=None, help="model cache directory (default $CFAUDIT_CACHE)")
    parser.add_argument("--checkpoints", default=None, help="URI prefix for training checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from engine.methods import make_method

    test = load_dataset("shapes", "test", **SHAPES)
    unbiased = load_dataset("shapes", "train", **SHAPES)
    oracle, _ = get_or_train("oracle", "attribute_oracle", {}, unbiased, dataset_fingerprint(unbiased),
                             {"epochs": 3}, seed=0, cache_dir=args.cache)
    marker = list(unbiased.attribute_names).index("marker")
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = make_explainer_config({**FULL, **overrides})
    print(f"explainer config: {config}", flush=True)
    x = test.x[:args.queries]
    noise = SHAPES.get("noise", 0.03) * 3 ** 0.5 / 2  # mean |U(-a, a)| = a/2 with a = σ√3: the per-pixel noise
    results = {}
    for name, (data_options, train_kwargs) in CLASSIFIERS.items():
        if args.only and name not in args.only:
            continue
        data = load_dataset("shapes", "train", **SHAPES, **data_options)
        module, _ = get_or_train("classifier", "cnn", {}, data, dataset_fingerprint(data), train_kwargs, seed=0,
                                 cache_dir=args.cache)
        module.eval()
        handle = classifier_handle_from_module(module, f"cnn-{name}", data.input_shape, data.class_names,
                                               data.value_range)
        acc = (handle.predict(test.x) == test.y).float().mean().item()
        start = time.perf_counter()
        uri = f"{args.checkpoints.rstrip('/')}/{name}" if args.checkpoints else None
        explainer, info = get_or_train_explainer(
            module, unbiased, dataset_fingerprint(unbiased), config, seed=0, cache_dir=args.cache,
            checkpoint_uri=uri, log=lambda line: print(line, flush=True))
        wall = time.perf_counter() - start
        pred = handle.predict(x)
        q = QueryBatch(x=x, target=1 - pred, query_id=torch.arange(len(x)))
        cf = make_method("exaggeration").explain(q, ModelBundle(classifier=handle, explainer=explainer))
        rec = reconstruction_l1(explainer, module, x)
        with torch.no_grad():
            f0 = classifier_positive_probs(module, x, explainer.positive_class)
            x_rec = explainer(x, bin_index(f0, explainer.num_bins))
            same = ((oracle(x) > 0) == (oracle(x_rec) > 0)).all(1).float().mean().item()
        results[name] = {
            "test_accuracy": acc, "spearman": spearman(cf.extras["desired"], cf.extras["achieved"]),
            "spearman_per_query": spearman_per_query(cf.extras["desired"], cf.extras["achieved"]),
            "constant_series": int((cf.extras["achieved"].amax(1) == cf.extras["achieved"].amin(1)).sum()),
            "rec_l1": rec.mean().item(), "rec_oracle_agreement": same, "validity": cf.success.float().mean().item(),
            "confounding": confounding_rate(oracle, x, cf.x_cf, marker),
            "train_seconds": info["train_seconds"], "cache_hit": info["cache_hit"], "wall_seconds": wall}
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in results[name].items()), flush=True)
    nn_l1 = nearest_other_l1(x).mean().item()
    print(f"reference: per-pixel noise mean |n| = {noise:.4f}, mean L1 to the nearest other query = {nn_l1:.4f}")
    if len(results) == 2:
        print(f"confounding rate: biased {results['biased']['confounding']:.3f} vs fair "
              f"{results['fair']['confounding']:.3f}")
    return results


if __name__ == "__main__":
    main()

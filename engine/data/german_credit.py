"""`german_credit`: the Statlog German credit table (1000 applicants x 20 features, good/bad credit),
shipped with its feature schema: 7 integer, 1 ordinal and 12 categorical features, two immutable
(personal_status, foreign_worker) and age that may only increase.

Source: UCI Machine Learning Repository, Statlog (German Credit Data), Hofmann 1994, CC BY 4.0; the
codes (A11, ...) are decoded to short labels in engine/data/files/german_credit.csv.
"""
from __future__ import annotations

from importlib import resources

from engine.data.base import ArrayDataset
from engine.data.tabular import load_tabular

SPLIT_SEED = 0


def files(name: str) -> str:
    return str(resources.files("engine.data") / "files" / name)


def load_german_credit(split: str = "train") -> ArrayDataset:
    """x [N, 57] the schema's encoding in [0, 1]; y 0 = bad, 1 = good; stratified 80/20 split (seed 0)."""
    ds = load_tabular(split, path=files("german_credit.csv"), label_column="credit",
                      schema=files("german_credit.schema.yaml"), test_fraction=0.2, seed=SPLIT_SEED)
    ds.name = "german_credit"
    ds.meta["source"] = "UCI Statlog (German Credit Data), CC BY 4.0"
    return ds

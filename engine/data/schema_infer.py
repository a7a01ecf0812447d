"""Feature schemas from tables: inference, and the user's corrections as the dataset option `schema`
(the format is described in engine.data.schema)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import ValidationError

from engine.data._common import url_to_fs
from engine.data.schema import FeatureSpec, TabularSchema


def infer_schema(df, columns: Optional[Sequence[str]] = None) -> TabularSchema:
    """A schema from the table: strings and booleans categorical (sorted values), integer columns integer,
    floats continuous; ranges are the column's min and max."""
    import polars as pl  # deferred: polars loads only for tabular data

    features = []
    for name in (columns if columns is not None else df.columns):
        col = df[name]
        if col.null_count():
            raise ValueError(f"column {name!r} has {col.null_count()} null values; fill or drop them first")
        if col.dtype == pl.Boolean or not col.dtype.is_numeric():
            features.append(FeatureSpec(name=name, type="categorical",
                                        categories=tuple(sorted(col.cast(pl.String).unique().to_list()))))
            continue
        v = col.cast(pl.Float64).to_numpy()
        if not np.isfinite(v).all():
            raise ValueError(f"column {name!r} holds NaN or infinite values")
        kind = "integer" if col.dtype.is_integer() else "continuous"
        features.append(FeatureSpec(name=name, type=kind, range=(float(v.min()), float(v.max()))))
    return TabularSchema(features=tuple(features))


def resolve_schema(option: Any, df, columns: Sequence[str], where: str) -> TabularSchema:
    """The dataset option `schema` (the string "infer", a mapping, or a path to a YAML/JSON mapping) applied
    to table `df`, whose candidate feature columns are `columns`. Errors name the feature and the field."""
    if isinstance(option, (str, Path)) and str(option) != "infer":
        option = _read_mapping(str(option), where)
    if option == "infer":
        option = {"infer": True}
    if not isinstance(option, dict):
        raise ValueError(f"{where}: option 'schema' must be 'infer', a mapping or a file path, got {option!r}")
    unknown = sorted(set(option) - {"infer", "features"})
    if unknown:
        raise ValueError(f"{where}: schema has unknown field(s) {unknown}; expected 'infer' and 'features'")
    infer, given = option.get("infer", True), option.get("features") or {}
    if not isinstance(infer, bool):
        raise ValueError(f"{where}: schema field 'infer' must be true or false, got {infer!r}")
    if not isinstance(given, dict):
        raise ValueError(f"{where}: schema field 'features' must map feature names to their fields, got {given!r}")
    missing = [name for name in given if name not in df.columns]
    if missing:
        raise ValueError(f"{where}: schema features {missing} are not columns of the table; columns: {df.columns}")
    names = list(columns) + [n for n in given if n not in columns] if infer else list(given)
    inferred = {f.name: f for f in infer_schema(df, names).features}
    features = []
    for name in names:
        entry = given.get(name) or {}
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: schema feature {name!r} must be a mapping of fields, got {entry!r}")
        base = inferred[name].model_dump()
        if "type" in entry and entry["type"] != base["type"]:
            # A new type takes none of the inferred value description unless it still applies.
            keep_categories = entry["type"] in ("categorical", "ordinal") and base["categories"] is not None
            base.update(range=None if entry["type"] == "categorical" or keep_categories else base["range"],
                        categories=base["categories"] if keep_categories else None)
            if entry["type"] == "ordinal" and base["categories"] is None and base["range"] is None:
                base["range"] = inferred[name].bounds
        if "categories" in entry:
            base["range"] = None
        if "range" in entry:
            base["categories"] = None
        try:
            features.append(FeatureSpec(**{**base, **entry, "name": name}))
        except ValidationError as err:
            raise ValueError(f"{where}: schema feature {name!r}: {_pydantic_message(err)}") from None
    try:
        return TabularSchema(features=tuple(features))
    except ValidationError as err:
        raise ValueError(f"{where}: schema: {_pydantic_message(err)}") from None


def _read_mapping(path: str, where: str) -> dict:
    import yaml  # deferred: YAML loads only for a schema file

    fs, fpath = url_to_fs(path)
    if not fs.exists(fpath):
        raise FileNotFoundError(f"{where}: schema file {path} does not exist")
    with fs.open(fpath, "r") as f:
        text = f.read()
    try:
        data = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{where}: schema file {path} is not valid YAML/JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: schema file {path} must hold a mapping with 'features'")
    return data


def _pydantic_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)

"""DiCE (dice-ml, optional extra `dice`) as the DiCE bench's peer (jobs.bench_dice): its data, its view of the MLP,
and one counterfactual per query.

DiCE sees the MLP through `DiceLayoutModel`: DiCE one-hot encodes the categoricals and min-max scales the numeric
features itself (`get_ohe_min_max_normalized_data`: numeric columns first, scaled by the training frame's min/max,
then `feature_level` dummies); one fixed affine map turns that layout into cfaudit's 57 columns before the MLP, and
softmax gives DiCE the probabilities it wants.
"""
from __future__ import annotations

import contextlib
import copy
import io
import random
import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from engine.data.schema import TabularSchema
from engine.models.handles import ClassifierHandle
from engine.types import QueryBatch

DICE_METHODS = ("gradient", "random")
OUTCOME = "_outcome"  # DiCE's outcome column in its training frame


def device_of(handle: ClassifierHandle) -> torch.device:
    return next(handle.module.parameters()).device


class DiceLayoutModel(nn.Module):
    """DiCE's encoded row(s) [.., K] -> cfaudit's encoding [.., D] (one affine map) -> class probabilities [.., C].

    DiCE's gradient method feeds single rows [K] and reads `output[1:]` as p(class 1), so the leading shape is
    kept as given."""

    def __init__(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        z = x.float().reshape(-1, x.shape[-1]) @ self.weight + self.bias
        return torch.softmax(self.module(z), dim=-1).reshape(*lead, -1)


def dice_frame(schema: TabularSchema, x: torch.Tensor):
    """[N, D] encodings -> pandas frame as DiCE is given it: numeric features (ordinal as ranks 0..n-1) as int64
    or float64 columns, categoricals as strings."""
    import pandas as pd  # deferred: pandas is DiCE's dependency, loaded only when DiCE runs

    records = schema.decode(x)
    cols = {}
    for f in schema.features:
        values = [r[f.name] for r in records]
        if f.type == "categorical":
            cols[f.name] = [str(v) for v in values]
        elif f.type == "ordinal":
            cols[f.name] = np.array([f.categories.index(v) if f.categories else v for v in values], np.int64)
        elif f.type == "integer":
            cols[f.name] = np.array(values, np.int64)
        else:
            cols[f.name] = np.array(values, np.float64)
    return pd.DataFrame(cols)


def layout_map(schema: TabularSchema, ohe_columns: list[str], data_min: dict, data_max: dict
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, D], bias [D]) with cfaudit = dice @ weight + bias, from DiCE's encoded column names and the
    min/max DiCE normalises each numeric feature with."""
    index = {c: k for k, c in enumerate(ohe_columns)}
    weight = torch.zeros(len(ohe_columns), schema.width, dtype=torch.float64)
    bias = torch.zeros(schema.width, dtype=torch.float64)
    col, used = 0, set()
    for f in schema.features:
        if f.type == "categorical":
            for j, level in enumerate(f.categories):
                k = index.get(f"{f.name}_{level}")
                if k is not None:  # a category absent from DiCE's training frame has no column: stays 0
                    weight[k, col + j] = 1.0
                    used.add(k)
        else:
            k = index[f.name]
            lo, hi = f.bounds
            dmin, dmax = float(data_min[f.name]), float(data_max[f.name])
            span = hi - lo if hi > lo else 1.0
            # DiCE: v = (u - dmin) / (dmax - dmin); cfaudit: (u - lo) / (hi - lo)
            weight[k, col] = (dmax - dmin) / span if dmax > dmin else 0.0
            bias[col] = (dmin - lo) / span
            used.add(k)
        col += f.width
    missing = sorted(set(range(len(ohe_columns))) - used)
    if missing:
        raise ValueError(f"DiCE's encoded columns {[ohe_columns[k] for k in missing]} match no schema column")
    return weight, bias


def check_layout(data, module: DiceLayoutModel, handle: ClassifierHandle, frame, x: torch.Tensor) -> None:
    """The wrapped model on DiCE's encoding of `frame` must give the MLP's probabilities on cfaudit's `x`."""
    encoded = data.get_ohe_min_max_normalized_data(frame)
    with torch.no_grad():
        theirs = module(torch.tensor(encoded.to_numpy(np.float64)).float())
        ours = handle.probs(x.to(device_of(handle))).cpu()
    gap = (theirs - ours).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"DiCE's layout does not map onto cfaudit's encoding: probabilities differ by {gap:.3g}")


def _dice_record(schema: TabularSchema, row) -> dict:
    """A row of DiCE's output frame -> a record (ordinal ranks kept as numbers for `encode_records`)."""
    rec = {}
    for f in schema.features:
        v = row[f.name]
        rec[f.name] = str(v) if f.type == "categorical" else float(v)
    return rec


def run_dice(method: str, schema: TabularSchema, handle: ClassifierHandle, reference, queries: QueryBatch,
             seed: int, log: Callable[[str], None] = print) -> tuple[list[float], list[Optional[dict]], dict]:
    """One DiCE counterfactual per query, timed per query; returns (seconds per query, records, config)."""
    import dice_ml  # deferred: the optional extra `dice`; the bench skips DiCE when it is not installed
    from raiutils.exceptions import UserConfigValidationException

    train_df = dice_frame(schema, reference.x)
    train_df[OUTCOME] = reference.y.cpu().numpy().astype(np.int64)
    numeric = [f.name for f in schema.features if f.type != "categorical"]
    data = dice_ml.Data(dataframe=train_df, continuous_features=numeric, outcome_name=OUTCOME)
    data_min = {n: train_df[n].min() for n in numeric}
    data_max = {n: train_df[n].max() for n in numeric}
    # DiCE's own layout, read from its data interface rather than assumed.
    ohe_columns = list(data.get_ohe_min_max_normalized_data(train_df.iloc[[0]][data.feature_names]).columns)
    weight, bias = layout_map(schema, ohe_columns, data_min, data_max)
    # DiCE builds CPU tensors: it gets a CPU copy of the MLP whatever device cfaudit runs on.
    module = DiceLayoutModel(copy.deepcopy(handle.module).cpu(), weight, bias).eval()
    model = dice_ml.Model(model=module, backend="PYT", func="ohe-min-max")
    with _quiet():
        explainer = dice_ml.Dice(data, model, method=method)
    vary = [f.name for f in schema.features if not f.immutable]
    query_df = dice_frame(schema, queries.x)
    check_layout(data, module, handle, query_df, queries.x)
    times, records = [], []
    for i in range(len(queries)):
        row = query_df.iloc[[i]]
        qid = int(queries.query_id[i])
        np.random.seed(seed + qid)
        random.seed(seed + qid)
        torch.manual_seed(seed + qid)
        kwargs = {"random_seed": seed + qid} if method == "random" else {}
        start = time.perf_counter()
        try:
            with _quiet():
                exp = explainer.generate_counterfactuals(
                    row, total_CFs=1, desired_class="opposite", features_to_vary=vary,
                    permitted_range=_permitted_range(schema, row, data_min, data_max), **kwargs)
            ex = exp.cf_examples_list[0]
            out = ex.final_cfs_df_sparse if ex.final_cfs_df_sparse is not None else ex.final_cfs_df
            rec = _dice_record(schema, out.iloc[0]) if out is not None and len(out) else None
        except UserConfigValidationException:  # raised when no counterfactual was found
            rec = None
        times.append(time.perf_counter() - start)
        records.append(rec)
        if (i + 1) % 10 == 0 or i + 1 == len(queries):
            log(f"    dice:{method}: {i + 1}/{len(queries)} queries, {sum(times):.1f}s")
    config = {"features_to_vary": vary, "continuous_features": numeric, "encoded_columns": ohe_columns,
              "total_CFs": 1, "desired_class": "opposite", "returned": "final_cfs_df_sparse (posthoc sparsity 0.1)"}
    return times, records, config


def _permitted_range(schema: TabularSchema, row, data_min: dict, data_max: dict) -> dict:
    """Every numeric feature (DiCE's gradient method needs them all once one is given): the training frame's
    range, narrowed to one side of the query's value for a monotone feature (age only up)."""
    out = {}
    for f in schema.features:
        if f.type == "categorical":
            continue
        lo, hi = int(data_min[f.name]), int(data_max[f.name])
        if f.type == "continuous":
            lo, hi = float(data_min[f.name]), float(data_max[f.name])
        v = row[f.name].iat[0]
        if f.direction == "increase":
            lo, hi = v, max(hi, v)
        elif f.direction == "decrease":
            lo, hi = min(lo, v), v
        out[f.name] = [lo, hi]
    return out


@contextlib.contextmanager
def _quiet():
    """DiCE prints a line per query, a tqdm bar and pandas deprecation warnings; keep the output readable."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

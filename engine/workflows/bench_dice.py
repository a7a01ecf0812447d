"""`python -m jobs.bench --peer dice`: cfaudit's tabular methods beside DiCE's, on one MLP and one set of queries.

Every method goes through the same judge: its counterfactual as a record in the user's units -> the schema's
encoding (numbers scaled without checks, so nothing is repaired yet) -> `codec.project` onto a valid record ->
the MLP's argmax against the target. cfaudit's results are valid records already (projection is a no-op);
DiCE's are projected here, and what that changed is reported (`record_ok`, `immutable_changed`, ...).

DiCE (dice-ml, optional extra `dice`) sees the MLP through `DiceLayoutModel`: DiCE one-hot encodes the
categoricals and min-max scales the numeric features itself (`get_ohe_min_max_normalized_data`: numeric
columns first, scaled by the training frame's min/max, then `feature_level` dummies); one fixed affine map
turns that layout into cfaudit's 57 columns before the MLP, and softmax gives DiCE the probabilities it wants.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from engine.data import load_dataset
from engine.data.schema import TabularSchema, result_columns
from engine.explain import build_queries
from engine.methods import make_method
from engine.models.fleet import resolve_classifier
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.runtime.plan import select_queries
from engine.spec import AuditSpec, load_spec
from engine.types import QueryBatch

# GC §4.4.2: tabular tau 0.5; growing_spheres: gradient-free (forward passes only), its defaults
CFAUDIT_METHODS = {"gradual_construction": {"tau": 0.5}, "wachter": {}, "growing_spheres": {}}
DICE_METHODS = ("gradient", "random")
OUTCOME = "_outcome"  # DiCE's outcome column in its training frame


def tabular_spec_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("jobs") / "specs" / "tabular.yaml"))


@dataclass
class PeerRow:
    """One method's line of the table; times are per counterfactual (= per query, one CF each)."""

    method: str                 # "cfaudit:gradual_construction", "dice:gradient", ...
    queries: int
    s_per_cf: float             # cfaudit: median over repeats of (batched call / queries); DiCE: median per query
    s_per_cf_mean: float        # cfaudit: mean over repeats; DiCE: total time / queries
    returned: float             # share of queries with a counterfactual returned
    validity: float             # share of queries whose projected CF the MLP puts in the target class
    validity_raw: float         # same before projection (the record as returned, encoded without repair)
    record_ok: float            # share of returned CFs that were valid records already (projection a no-op)
    l0: float                   # mean features changed, over valid CFs (a category switch once)
    l1: float                   # mean L1 on the [0, 1] scale, over valid CFs
    immutable_changed: int      # returned CFs that changed an immutable feature (before projection)
    direction_violated: int     # returned CFs that moved a monotone feature the wrong way (before projection)
    ratio_vs_gc: float = float("nan")       # s_per_cf / cfaudit GC's
    ratio_vs_wachter: float = float("nan")  # s_per_cf / cfaudit wachter's
    notes: str = ""


@dataclass
class Judged:
    """Per-query outcome of the shared judge (numpy, length B)."""

    returned: np.ndarray
    valid: np.ndarray
    valid_raw: np.ndarray
    record_ok: np.ndarray
    l0: np.ndarray
    l1: np.ndarray
    immutable_changed: np.ndarray
    direction_violated: np.ndarray
    records: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the judge

def encode_records(schema: TabularSchema, records: Sequence[Optional[dict]], fallback: torch.Tensor) -> torch.Tensor:
    """Records in the user's units -> [B, D] float32 like `schema.encode`, but without range or integrality
    checks (a value outside its range or between integers stays so, for `project` to repair); an ordinal may
    be given by label or by rank. A missing record (None) takes its row of `fallback`."""
    out = fallback.detach().cpu().float().clone()
    for i, rec in enumerate(records):
        if rec is None:
            continue
        col = 0
        for f in schema.features:
            v = rec[f.name]
            if f.type == "categorical":
                out[i, col:col + f.width] = 0.0
                out[i, col + f.categories.index(str(v))] = 1.0
            else:
                if f.categories is not None and isinstance(v, str):
                    v = f.categories.index(v)
                lo, hi = f.bounds
                out[i, col] = (float(v) - lo) / (hi - lo) if hi > lo else 0.0
            col += f.width
    return out


def judge(schema: TabularSchema, handle: ClassifierHandle, x0: torch.Tensor, target: torch.Tensor,
          records: Sequence[Optional[dict]]) -> Judged:
    """x0 [B, D] queries, target [B]; records[i] the i-th counterfactual as a record (None: none returned)."""
    codec = schema.codec("cpu")
    x0 = x0.detach().cpu().float()
    target = target.detach().cpu()
    raw = encode_records(schema, records, x0)
    proj = codec.project(raw, x0)
    returned = np.array([r is not None for r in records])
    with torch.no_grad():
        valid = (handle.module(proj.to(_device_of(handle))).argmax(-1).cpu() == target).numpy() & returned
        valid_raw = (handle.module(raw.to(_device_of(handle))).argmax(-1).cpu() == target).numpy() & returned
    record_ok = ((proj - raw).abs().amax(1) < 1e-5).numpy() & returned
    # Immutables and directions judged on the record as returned, before projection restores them.
    ch = codec.changes(x0, codec.project(raw, raw))  # rounding only, to count a feature once
    immutable = torch.tensor([f.immutable for f in schema.features])
    immutable_changed = (ch["changed"] & immutable).any(1).numpy() & returned
    violated = np.zeros(len(records), dtype=bool)
    if len(codec.num_cols):
        d = (raw[:, codec.num_cols] - x0[:, codec.num_cols]).double()  # on [0, 1]; float32 noise is ~1e-7
        wrong = ((codec.num_dir > 0) & (d < -1e-4)) | ((codec.num_dir < 0) & (d > 1e-4))
        violated = wrong.any(1).numpy() & returned
    cols = result_columns(schema, x0, proj)
    return Judged(returned, valid, valid_raw, record_ok, cols["l0"], cols["l1"], immutable_changed, violated,
                  list(records))


def _device_of(handle: ClassifierHandle) -> torch.device:
    return next(handle.module.parameters()).device


def _row(method: str, judged: Judged, times: list[float], mean_time: float, notes: str = "") -> PeerRow:
    v, ret = judged.valid, judged.returned
    return PeerRow(
        method=method, queries=len(v), s_per_cf=statistics.median(times), s_per_cf_mean=mean_time,
        returned=float(ret.mean()), validity=float(v.mean()), validity_raw=float(judged.valid_raw.mean()),
        record_ok=float(judged.record_ok.sum() / max(1, ret.sum())),
        l0=float(judged.l0[v].mean()) if v.any() else float("nan"),
        l1=float(judged.l1[v].mean()) if v.any() else float("nan"),
        immutable_changed=int(judged.immutable_changed.sum()), direction_violated=int(judged.direction_violated.sum()),
        notes=notes)


# ---------------------------------------------------------------------------------------------- cfaudit

def run_cfaudit(name: str, params: dict, queries: QueryBatch, bundle: ModelBundle, repeats: int
                ) -> tuple[list[float], object]:
    """Seconds per CF of `repeats` batched calls (one call for all queries) and the last call's CFBatch."""
    method = make_method(name, params)
    method.explain(queries.select(slice(0, 2)), bundle)  # warm-up (reference statistics, allocator)
    times, cf = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        cf = method.explain(queries, bundle)
        times.append((time.perf_counter() - start) / len(queries))
    return times, cf


# ---------------------------------------------------------------------------------------------- DiCE

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
    import pandas as pd

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
        ours = handle.probs(x.to(_device_of(handle))).cpu()
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
    import dice_ml
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


# ---------------------------------------------------------------------------------------------- the bench

def bench_dice(spec_path: Optional[str] = None, queries: int = 50, peers: Sequence[str] = DICE_METHODS,
               repeats: int = 3, device: str = "cpu", out: Optional[str] = "cfaudit-out",
               command: Optional[str] = None, log: Callable[[str], None] = print) -> list[PeerRow]:
    """cfaudit GC, wachter and growing_spheres (batched) beside DiCE's `peers` (per query; skipped with a note
    when dice-ml is not installed) on the spec's last fleet model and `queries` seeded test queries, targets the
    other class; writes `<out>/bench/dice.parquet` (+ .json)."""
    from engine.runtime.host import pick_device

    unknown = sorted(set(peers) - set(DICE_METHODS))
    if unknown:
        raise ValueError(f"Expected `peers` among {list(DICE_METHODS)}, got {unknown}")
    spec = load_spec(AuditSpec, spec_path or str(tabular_spec_path()))
    dev = pick_device(device)
    entry = spec.fleet[-1]
    handle = resolve_classifier(entry, spec.dataset, spec.runtime.cache_dir, dev, log=log)
    reference = load_dataset(spec.dataset.name, "train", **spec.dataset.options)
    data = load_dataset(spec.dataset.name, spec.queries.split, **spec.dataset.options)
    schema = getattr(data, "schema", None)
    if schema is None:
        raise ValueError(f"dataset {spec.dataset.name!r} has no tabular schema; the DiCE bench needs one")
    ids = select_queries(data, queries, spec.queries.seed)
    bundle = ModelBundle(classifier=handle, reference=reference, device=dev)
    batch, _ = build_queries(bundle, data.x[ids], ids, data.y[ids], "flip", spec.seed)
    log(f"bench --peer dice: model {entry.id}, {spec.dataset.name} {spec.queries.split}, {len(batch)} queries, "
        f"device {dev}, torch threads {torch.get_num_threads()}")
    rows = []
    for name, params in CFAUDIT_METHODS.items():
        params = {**next((m.params for m in spec.methods if m.name == name), {}), **params}
        times, cf = run_cfaudit(name, params, batch, bundle, repeats)
        records = schema.decode(torch.nan_to_num(cf.x_cf.cpu()))
        judged = judge(schema, handle, batch.x, batch.target, records)
        rows.append(_row(f"cfaudit:{name}", judged, times, statistics.mean(times),
                         f"batched, median of {repeats}, params {params}"))
        log(_line(rows[-1]))
    dice_config = {}
    if peers and importlib.util.find_spec("dice_ml") is None:
        log(f"  dice-ml is not installed (pip install -e '.[dice]'): skipping dice:{', dice:'.join(peers)}")
        peers = ()
    for method in peers:
        times, records, dice_config = run_dice(method, schema, handle, reference, batch, spec.seed, log=log)
        judged = judge(schema, handle, batch.x, batch.target, records)
        rows.append(_row(f"dice:{method}", judged, times, sum(times) / len(times), "per query, total_CFs=1"))
        log(_line(rows[-1]))
    by = {r.method: r for r in rows}
    for r in rows:
        r.ratio_vs_gc = r.s_per_cf / by["cfaudit:gradual_construction"].s_per_cf
        r.ratio_vs_wachter = r.s_per_cf / by["cfaudit:wachter"].s_per_cf
    log(format_table(rows))
    if out is not None:
        meta = {"command": command or " ".join([Path(sys.executable).name, "-m", "jobs.bench", *sys.argv[1:]]),
                "versions": _versions(), "spec": str(spec_path or tabular_spec_path()), "model": entry.id,
                "queries": len(batch), "query_ids": batch.query_id.tolist(), "device": str(dev),
                "torch_threads": torch.get_num_threads(), "dice": dice_config,
                "cfaudit_params": CFAUDIT_METHODS}
        path = write_table(rows, meta, out)
        log(f"wrote {path} (+ {path.with_suffix('.json').name})")
    return rows


def _line(r: PeerRow) -> str:
    return (f"  {r.method:30s} {r.s_per_cf * 1e3:10.2f} ms/cf  validity {r.validity:.2f} "
            f"(raw {r.validity_raw:.2f})  l0 {r.l0:.2f}  l1 {r.l1:.3f}  immutable changed {r.immutable_changed}")


def format_table(rows: Sequence[PeerRow]) -> str:
    head = (f"{'method':30s} {'s/cf (median)':>13s} {'s/cf (mean)':>11s} {'returned':>8s} {'valid':>6s} "
            f"{'valid raw':>9s} {'record ok':>9s} {'l0':>5s} {'l1':>6s} {'immut.':>6s} {'dir.':>4s} "
            f"{'x GC':>8s} {'x wachter':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.method:30s} {r.s_per_cf:13.5f} {r.s_per_cf_mean:11.5f} {r.returned:8.2f} {r.validity:6.2f} "
                     f"{r.validity_raw:9.2f} {r.record_ok:9.2f} {r.l0:5.2f} {r.l1:6.3f} {r.immutable_changed:6d} "
                     f"{r.direction_violated:4d} {r.ratio_vs_gc:8.1f} {r.ratio_vs_wachter:9.1f}")
    return "\n".join(lines)


def write_table(rows: Sequence[PeerRow], meta: dict, out: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(out) / "bench" / "dice.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([asdict(r) for r in rows])
    table = table.replace_schema_metadata({b"cfaudit.bench": json.dumps(meta).encode()})
    pq.write_table(table, path)
    path.with_suffix(".json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2,
                                                    default=float))
    return path


def _versions() -> dict[str, Any]:
    from importlib import metadata

    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for dist in ("dice-ml", "numpy", "pandas", "cfaudit"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out

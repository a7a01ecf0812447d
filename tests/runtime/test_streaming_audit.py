"""An audit of a user's Parquet images and a fleet of TorchScript models through Ray, at CI size: the hosts read
only their units' query rows (never the split), each host keeps at most `models_per_host` models, every model's
units go to the host that holds it, and the results equal those of
hosts given the rows from the split loaded whole."""
import polars as pl
import pytest
import torch
from torch import nn

from engine.spec import AuditSpec, parse_spec
from engine.store.results import result_files
from engine.workflows.audit import audit

pytestmark = pytest.mark.ray

ROWS, QUERIES, MODELS = 300, 12, 3
KEYS = ["model_id", "method", "query_id", "target"]


def _images(path, rows: int) -> None:
    """A user's Parquet (PNG bytes in {"bytes", "path"} structs, as Hugging Face writes them), row groups of 40."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(rows, 3, 16, 16, generator=g) * 255).round().to(torch.uint8)
    y = torch.randint(0, 2, (rows,), generator=g)
    blobs = []
    for image in x:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8)).save(buffer, format="PNG")
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    pq.write_table(pa.table({"image": blobs, "label": y.numpy()}), path, row_group_size=40)


def _fleet(tmp_path) -> list[dict]:
    entries = []
    for seed in range(MODELS):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 2))
        path = tmp_path / f"m{seed}.pt"
        torch.jit.script(model).save(str(path))
        entries.append({"id": f"m{seed}", "path": str(path), "format": "torchscript", "trust": True})
    return entries


def _spec(tmp_path, out: str, **runtime) -> dict:
    return {"name": "streamed", "output": out, "overwrite": True,
            "dataset": {"name": "parquet_images", "options": {"path": str(tmp_path / "images.parquet"), "test_fraction": 0.5}},
            "fleet": _fleet(tmp_path), "queries": {"count": QUERIES, "seed": 0}, "targets": "flip",
            "methods": [{"name": "fgsm"}, {"name": "wachter", "params": {"max_iter": 30}}],
            "metrics": {"fid": {"extractor": "none"}, "deletion_steps": 0, "bootstrap_samples": 10},
            "runtime": {"batch_size": 6, "num_actors": 2, "num_cpus_per_actor": 1, **runtime}}


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, local_ray):
    tmp_path = tmp_path_factory.mktemp("streamed")
    _images(tmp_path / "images.parquet", ROWS)
    spec = parse_spec(AuditSpec, _spec(tmp_path, str(tmp_path / "streamed"), models_per_host=1))
    return tmp_path, spec, audit(spec, progress=False)


def test_hosts_read_only_their_units_rows(streamed):
    _, _, result = streamed
    hosts = result.account["hosts"]
    assert result.units_failed == [] and result.units_done == MODELS * 2 * 2
    # Each unit reads its own 6 query rows; the split has ROWS / 2 rows and is never read whole.
    assert sum(h["rows_read"] for h in hosts) == MODELS * 2 * QUERIES
    assert all(h["rows_read"] < ROWS // 2 for h in hosts)


def test_the_budget_holds_and_each_model_stays_on_its_host(streamed):
    _, _, result = streamed
    account = result.account
    assert all(h["peak_resident"] <= 1 for h in account["hosts"]), account
    assert set(account["model_loads"]) == {f"m{i}" for i in range(MODELS)}
    # Routing: each model's 4 units run where it is loaded; a second load only when an idle host shares the tail.
    assert sum(account["model_loads"].values()) <= MODELS + 1, account
    assert account["driver_peak_rss_mib"] > 0
    assert all(h["peak_rss_mib"] > 0 for h in account["hosts"] if h["units"]), account


def test_streamed_results_equal_a_host_given_the_split_in_memory(streamed):
    """The same units run in this process by a host handed each unit's rows from load_dataset (the whole split)."""
    from engine.data import load_dataset
    from engine.runtime.host import ModelHost
    from engine.runtime.plan import plan_units, select_queries, unit_row
    from engine.store.commit import Claim
    from engine.store.uri import write_bytes_atomic

    tmp_path, spec, _ = streamed
    out = str(tmp_path / "in-memory")
    spec = spec.model_copy(update={"output": out})
    data = load_dataset(spec.dataset.name, spec.queries.split, **spec.dataset.options)
    write_bytes_atomic(f"{out}/_job.json", ('{"spec_hash": "%s"}' % spec.spec_hash()).encode())
    with Claim(out, "in-memory").acquire() as claim:
        host = ModelHost(spec.model_dump(mode="json"), run_id=claim.run_id)
        for unit in plan_units(spec, select_queries(data, QUERIES, 0)):
            assert host.run_unit(unit_row(unit, data))["error"] == ""
    columns = [c for c in pl.read_parquet(result_files(out)).columns if c not in ("seconds", "unit_id")]
    a = pl.read_parquet(result_files(str(tmp_path / "streamed"))).select(columns).sort(KEYS)
    b = pl.read_parquet(result_files(out)).select(columns).sort(KEYS)
    assert a.height == b.height == MODELS * 2 * QUERIES
    assert a.drop("x_cf").equals(b.drop("x_cf")) and a["x_cf"].to_list() == b["x_cf"].to_list()

"""A model host that dies every time it runs one unit (SIGKILL, as the OOM killer would): the job ends with
exit status 1, that unit recorded failed with why, every other unit written exactly once, no partial shard,
and the account of done / failed units exact. Run as a user would: `python -m engine.cli audit SPEC`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from engine.store.results import result_files
from tests.fixtures.s3 import tiny_audit_spec
from tests.hardening.killer import DEADLY_BATCH, build

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray


def test_a_unit_that_kills_its_host_every_time_is_reported_and_the_rest_is_kept(tmp_path):
    torch.save(build().state_dict(), tmp_path / "weights.pt")
    spec = tiny_audit_spec(str(tmp_path / "out"))
    spec["fleet"] = [{"id": "dies", "path": str(tmp_path / "weights.pt"), "format": "state_dict",
                      "factory": "tests.hardening.killer:build"}]
    spec["queries"] = {"count": 20 + DEADLY_BATCH, "seed": 0}  # units of 10, 10 and the deadly 5
    spec["runtime"].update(max_retries=1)
    spec["methods"] = [{"name": "wachter", "params": {"max_iter": 20}}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}  # hosts import the factory
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "engine.cli", "audit", str(tmp_path / "spec.yaml")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    assert ("unit dies/wachter/00002 failed: HostDied: the host process died 2 times running this unit"
            in run.stdout), run.stdout[-3000:]
    assert "units: 2 done (0 needed a retry), 0 skipped (already written), 1 failed" in run.stdout
    out = tmp_path / "out"
    failures = pl.read_parquet(out / "reports" / "failures.parquet")
    assert failures["unit_id"].to_list() == ["dies/wachter/00002"]
    rows = pl.read_parquet(result_files(str(out)))
    assert rows.height == 20 and rows["query_id"].n_unique() == 20
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]  # no partial file left behind

"""Failures in the middle of a real Ray audit lose and duplicate nothing.

- a model host killed mid-job (SIGKILL of its process, as the OOM killer would) is replaced by Ray Data
  and its unit re-run: every (model, method, query, target) lands exactly once;
- the driver killed mid-job and the same command run again resumes, and the results equal those of an
  uninterrupted run (Wachter is deterministic).
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import polars as pl
import pytest
import yaml

from engine.spec import AuditSpec, parse_spec
from engine.store.results import finished_units, result_files
from engine.workflows.audit import audit
from tests.fixtures.ray import host_pids
from tests.fixtures.s3 import tiny_audit_spec

pytestmark = pytest.mark.ray

KEYS = ["model_id", "method", "query_id", "target"]


def _spec(out: str) -> dict:
    spec = tiny_audit_spec(out)
    spec.update(queries={"count": 60, "seed": 0}, runtime={"batch_size": 10, "num_actors": 1, "max_retries": 2},
                methods=[{"name": "wachter", "params": {"max_iter": 150}}])
    return spec


def _rows(out: str) -> pl.DataFrame:
    return pl.read_parquet(result_files(out)).drop("seconds", "unit_id").sort(KEYS)


def _kill_a_host_after_first_shard(out: str, killed: list) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        pids = host_pids() if finished_units(out) else []
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            return
        time.sleep(0.2)


def test_a_killed_host_is_replaced_and_nothing_is_lost_or_doubled(tmp_path, local_ray):
    out = str(tmp_path / "killed-host")
    killed: list = []
    killer = threading.Thread(target=_kill_a_host_after_first_shard, args=(out, killed), daemon=True)
    killer.start()
    result = audit(parse_spec(AuditSpec, _spec(out)), progress=False)
    killer.join(timeout=5)
    assert killed, "no host was killed: the job ended before the first shard appeared"
    assert result.units_failed == [] and result.units_done == 6
    rows = _rows(out)
    assert rows.height == 60 and rows.select(KEYS).n_unique() == 60


def test_a_killed_driver_resumes_to_the_uninterrupted_results(tmp_path, local_ray):
    reference = str(tmp_path / "uninterrupted")
    audit(parse_spec(AuditSpec, _spec(reference)), progress=False)

    out = str(tmp_path / "resumed")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(out)))
    command = [sys.executable, "-m", "jobs.audit", str(spec_file)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not finished_units(out) and driver.poll() is None:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    partial = len(finished_units(out))
    assert 0 < partial < 6, f"{partial} of 6 units were written before the kill"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    # A host may finish the unit it was on after the driver died (its shard lands whole or not at all).
    resumed_from = int(re.search(r"(\d+) already done", rerun.stdout).group(1))
    assert partial <= resumed_from < 6
    resumed, expected = _rows(out), _rows(reference)
    assert resumed.height == 60 and resumed.select(KEYS).n_unique() == 60
    assert resumed.drop("x_cf").equals(expected.drop("x_cf"))
    assert resumed["x_cf"].to_list() == expected["x_cf"].to_list()

"""A model host that dies every time it runs one unit (SIGKILL, as the OOM killer would): the job ends with
exit status 1, that unit recorded failed with why, every other unit written exactly once, no partial shard,
and the account of done / failed units exact. A host that cannot start (its constructor kills its process
or raises, every time) ends the job with exit status 2 and why, instead of being restarted forever.
Run as a user would: `python -m engine.cli audit SPEC`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from torch import nn

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


# An oracle whose factory, run in any Ray worker (a model host's constructor loads the oracle), kills its process
# or raises; in the driver, which loads and dry-runs it before Ray starts, it is a linear attribute classifier.
ORACLE = """
import os
import signal

from torch import nn


def build(action):
    with open("/proc/self/cmdline", "rb") as fh:  # Ray titles its worker processes ray::<class or task>
        in_ray_worker = fh.read().startswith(b"ray::")
    if in_ray_worker and action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if in_ray_worker and action == "raise":
        raise RuntimeError("the licence server is unreachable")
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
"""


@pytest.mark.parametrize("action, message", [
    ("kill", "the model host could not start: its process died 3 times in its constructor (killed, out of "
             "memory, or a crash in native code; runtime.max_retries + 1 attempts)"),
    ("raise", "the model host could not start: its constructor raised RuntimeError: the licence server is "
              "unreachable"),
])
def test_a_host_that_cannot_start_ends_the_job_with_why(tmp_path, action, message):
    (tmp_path / "ctor_oracle.py").write_text(ORACLE)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)).state_dict(), tmp_path / "oracle.pt")
    spec = tiny_audit_spec(str(tmp_path / "out"))
    spec["oracle"] = {"path": str(tmp_path / "oracle.pt"), "format": "state_dict", "factory": "ctor_oracle:build",
                      "factory_kwargs": {"action": action}, "attribute_names": ["a", "b"]}
    spec["runtime"].update(max_retries=2)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}  # the hosts import the factory
    env.pop("RAY_ADDRESS", None)
    # Before the fix the pool restarted the host forever (kill), or Ray's ActorDiedError ended it with a
    # traceback (raise); 300 s is the generous bound for a loaded 2-core machine, not the expected time.
    run = subprocess.run([sys.executable, "-m", "engine.cli", "audit", str(tmp_path / "spec.yaml")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"cfaudit audit: error: {message}" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert not result_files(str(tmp_path / "out"))


def test_a_host_the_cluster_has_no_room_for_ends_the_job_at_the_start_timeout(local_ray):
    import time

    from engine.runtime.host_start import HostStartError, probe_host

    start = time.monotonic()
    expected = (r"^the model host did not start within 3 s \(runtime\.host_start_timeout_s\): the cluster has no "
                r"room for one \(num_cpus=64, num_gpus=0\)")
    with pytest.raises(HostStartError, match=expected):
        probe_host(dict, {}, {"num_cpus": 64, "num_gpus": 0}, attempts=3, timeout_s=3)
    assert time.monotonic() - start < 60

"""A resume never mixes runs (issue 22), through real audits on a local Ray.

- Resuming with another `runtime.batch_size`, or after the model file changed, is refused naming what changed
  (old: duplicated or dropped rows, or the old model's results kept); `overwrite: true` starts again.
- Crash consistency: drivers killed (and hosts with them) at 20 seeded random points, the same command re-run each
  time; the final results equal an uninterrupted run's row for row, and nothing temporary is left behind.
"""
import os
import random
import re
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import yaml

from engine.spec import AuditSpec, parse_spec
from engine.store.commit import list_files
from engine.store.results import finished_units, result_files
from engine.workflows.audit import audit
from tests.fixtures.linear import save_weights
from tests.fixtures.ray import host_pids
from tests.fixtures.zoo import SHAPES

pytestmark = pytest.mark.ray

KEYS = ["model_id", "method", "query_id", "target"]


def _spec(out: str, weights: str, **changes) -> dict:
    spec = {
        "name": "integrity", "output": out, "dataset": {"name": "shapes", "options": dict(SHAPES)},
        "fleet": [{"id": "lin", "path": weights, "factory": "tests.fixtures.linear:build"}],
        "queries": {"count": 40, "seed": 0}, "targets": "flip",
        "methods": [{"name": "wachter", "params": {"max_iter": 60}}, {"name": "fgsm"}],
        "runtime": {"batch_size": 5, "num_actors": 1, "num_cpus_per_actor": 1, "max_retries": 1},
        "metrics": {"fid": {"extractor": "none"}, "deletion_steps": 0, "bootstrap_samples": 10},
    }
    spec.update(changes)
    return spec


def _rows(out: str) -> pl.DataFrame:
    return pl.read_parquet(result_files(out)).drop("seconds", "unit_id").sort(KEYS)


def test_another_batch_size_or_model_file_is_refused_and_overwrite_starts_again(tmp_path, local_ray):
    weights = save_weights(str(tmp_path / "lin.pt"), seed=0)
    out = str(tmp_path / "out")
    audit(parse_spec(AuditSpec, _spec(out, weights)), log=lambda *_: None, progress=False)
    first = _rows(out)
    assert first.height == 80 and first.select(KEYS).n_unique() == 80

    # Old: 16 units of 5 were cut into 10 of 4 + ... and rows of parts re-run appeared twice.
    cut = _spec(out, weights, runtime={"batch_size": 4, "num_actors": 1})
    with pytest.raises(ValueError, match=r"runtime\.batch_size 5, this run cuts its units at 4.*overwrite: true"):
        audit(parse_spec(AuditSpec, cut), log=lambda *_: None, progress=False)

    # Old: the same path with other bytes resumed on top of the old model's results.
    save_weights(weights, seed=1)
    with pytest.raises(ValueError, match=r"other weights for \['lin'\].*overwrite: true"):
        audit(parse_spec(AuditSpec, _spec(out, weights)), log=lambda *_: None, progress=False)
    assert _rows(out).equals(first)  # refused before anything was written

    again = audit(parse_spec(AuditSpec, _spec(out, weights, overwrite=True)), log=lambda *_: None, progress=False)
    assert again.units_skipped == 0 and again.units_done == 16
    rows = _rows(out)
    assert rows.height == 80 and rows.select(KEYS).n_unique() == 80
    assert not rows["p_orig"].to_list() == first["p_orig"].to_list()  # the new model's results, only


def _wait(condition, driver: subprocess.Popen, limit: float = 300.0) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and driver.poll() is None and not condition():
        time.sleep(0.1)


def test_killed_at_random_points_the_results_equal_an_uninterrupted_run(tmp_path, local_ray):
    import ray

    weights = save_weights(str(tmp_path / "lin.pt"), seed=0)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every driver joins this test's Ray: no start-up per run

    def command(out: str) -> list[str]:
        spec_file = tmp_path / f"{os.path.basename(out)}.yaml"
        small_units = {"batch_size": 2, "num_actors": 1, "num_cpus_per_actor": 1, "max_retries": 1}
        spec_file.write_text(yaml.safe_dump(_spec(out, weights, runtime=small_units)))  # 40 units
        return [sys.executable, "-m", "jobs.audit", str(spec_file)]

    reference = str(tmp_path / "uninterrupted")
    done = subprocess.run(command(reference), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    out, rng, kills = str(tmp_path / "crashed"), random.Random(22), []
    run = command(out)
    for attempt in range(20):
        driver = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        before, wait_for = len(finished_units(out)), rng.randint(0, 2)
        _wait(lambda: len(finished_units(out)) >= before + wait_for, driver)
        time.sleep(rng.uniform(0.0, 0.6))
        if rng.random() < 0.5:  # a host killed mid-unit, as the OOM killer would, then the driver
            for pid in host_pids()[:1]:
                os.kill(pid, signal.SIGKILL)
                kills.append(("host", attempt))
            time.sleep(rng.uniform(0.0, 0.6))
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            kills.append(("driver", attempt))
        driver.wait()
    assert sum(kind == "driver" for kind, _ in kills) >= 10, kills  # most runs were cut off, not finished

    final = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    resumed, expected = _rows(out), _rows(reference)
    assert resumed.height == 80 and resumed.select(KEYS).n_unique() == 80
    assert resumed.drop("x_cf").equals(expected.drop("x_cf"))
    assert resumed["x_cf"].to_list() == expected["x_cf"].to_list()
    assert list_files(out, re.compile(r"(^|/)\.tmp-")) == {}  # no temporaries left behind
    assert not os.path.exists(os.path.join(out, "_lock.json"))  # the last run released its claim

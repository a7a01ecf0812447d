"""An interrupted sweep resumes with Tuner.restore: finished trials are kept, the rest run, each exactly once."""
import json
import os
import signal
from pathlib import Path

import polars as pl
import pytest
from ray import tune

from engine.spec import parse_spec
from engine.spec.sweep import SweepSpec
from engine.workflows.sweep import sweep

pytestmark = pytest.mark.ray

EPSILONS = [0.02, 0.05, 0.1, 0.2]


class InterruptAfter(tune.Callback):
    """Stops the run like a Ctrl-C (Tune's SIGUSR1 handler: state saved, fit returns) after n finished trials.

    Armed by a flag file so the copy Tune pickles with the run config cannot fire again after a restore.
    """

    def __init__(self, n: int, flag: str) -> None:
        self.n, self.flag, self.seen = n, flag, 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.seen += 1
        if self.seen >= self.n and os.path.exists(self.flag):
            os.remove(self.flag)
            os.kill(os.getpid(), signal.SIGUSR1)


def test_interrupted_sweep_resumes_every_trial_once(tmp_path, local_ray):
    spec = parse_spec(SweepSpec, {
        "name": "fgsm_eps", "output": str(tmp_path), "dataset": {"name": "breast_cancer"},
        "fleet": [{"id": "mlp", "train": {"arch": "mlp", "epochs": 2}}],
        "queries": {"count": 16, "seed": 1}, "targets": "flip",
        "method": {"name": "fgsm", "params": {"steps": 5}}, "space": {"epsilon": {"grid": EPSILONS}},
        "objectives": [{"metric": "flip_ratio", "mode": "max"}, {"metric": "mean_l1", "mode": "min"}],
        "max_concurrent_trials": 1, "examples": 0,
    })
    flag = tmp_path / "armed"
    flag.touch()
    first = sweep(spec, log=lambda *_: None, progress=False, callbacks=[InterruptAfter(2, str(flag))])
    assert not first.complete and not flag.exists()
    done = first.trials.filter(pl.col("status") == "TERMINATED")
    assert 2 <= done.height < len(EPSILONS)
    assert not (tmp_path / "sweeps" / "fgsm_eps" / "pareto.parquet").exists()

    lines: list[str] = []
    second = sweep(spec, log=lines.append, progress=False)
    assert second.complete and any("resuming the sweep" in line for line in lines)
    trials = second.trials
    assert trials.height == len(EPSILONS) and (trials["status"] == "TERMINATED").all()
    assert sorted(trials["epsilon"].to_list()) == EPSILONS and trials["trial_id"].n_unique() == len(EPSILONS)
    # Trials finished before the interruption were not run again: same ids, same rows.
    kept = trials.filter(pl.col("trial_id").is_in(done["trial_id"].to_list())).sort("trial_id")
    assert kept.select(done.columns).equals(done.sort("trial_id"))
    # Each trial reported exactly once over both runs: one line in its result.json.
    experiment = Path(second.directory) / "tune"
    results = sorted(experiment.glob("*/result.json"))
    assert len(results) == len(EPSILONS)
    for path in results:
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert len(reports) == 1, path
    assert (Path(second.directory) / "pareto.parquet").exists() and (Path(second.directory) / "index.html").exists()

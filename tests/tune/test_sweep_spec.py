"""SweepSpec validation: every error names the field; the example specs load."""
from pathlib import Path

import pytest

from engine.cli import main
from engine.spec import SpecError, load_spec, parse_spec
from engine.spec.sweep import SweepSpec

SPECS = Path(__file__).resolve().parents[2] / "jobs" / "specs"
BASE = {
    "output": "/tmp/x",
    "dataset": {"name": "breast_cancer"},
    "fleet": [{"id": "mlp", "train": {"arch": "mlp"}}],
    "method": {"name": "gradual_construction", "params": {"sigma": 50}},
    "space": {"lam": {"grid": [0.1, 1.0]}},
    "objectives": [{"metric": "flip_ratio", "mode": "max"}, {"metric": "mean_l0", "mode": "min"}],
}


def with_(**changes):
    return {**BASE, **changes}


@pytest.mark.parametrize("name", ["sweep_aip_alpha.yaml", "sweep_gc_tabular.yaml"])
def test_example_specs_are_valid(name):
    spec = load_spec(SweepSpec, SPECS / name)
    assert spec.expected_trials() >= 5 and spec.objectives


def test_defaults():
    spec = parse_spec(SweepSpec, BASE)
    assert spec.search == "grid" and spec.num_samples == 1 and spec.queries.count == 64
    assert spec.resources.cpu == 1 and spec.resources.gpu == 0 and spec.metrics.fid.extractor == "none"
    assert spec.expected_trials() == 2
    other = parse_spec(SweepSpec, with_(metrics={"lpr_tolerance": 0.1}))  # FID stays off unless asked
    assert other.metrics.fid.extractor == "none" and other.metrics.lpr_tolerance == 0.1


@pytest.mark.parametrize("data, match", [
    (with_(space={"lamda": {"grid": [0.1]}}), r"space.lamda: not a config field of 'gradual_construction'"),
    (with_(objectives=[{"metric": "accuracy", "mode": "max"}]),
     r"objectives\[0\].metric: unknown metric 'accuracy'"),
    (with_(objectives=[{"metric": "mean_l0", "mode": "lowest"}]), r"objectives\[0\].mode: Input should be 'max'"),
    (with_(objectives=[{"metric": "mean_lpr", "mode": "min"}]), r"objectives\[0\].metric: mean_lpr .*encoder"),
    (with_(objectives=[{"metric": "confounding_rate", "mode": "min"}]), r"confounding_rate needs an `oracle`"),
    (with_(objectives=[{"metric": "fid", "mode": "min"}]), r"fid needs metrics.fid.extractor"),
    (with_(objectives=[]), r"objectives: List should have at least 1 item"),
    (with_(space={"lam": {"uniform": [0.1, 1.0]}}), r"space.lam: search 'grid' takes `grid` values only"),
    (with_(space={"lam": {"grid": [-1.0]}}), r"space.lam: .*gradual_construction.lam` to be >= 0"),
    (with_(space={"tau": {"uniform": [0.5, 1.5]}}, search="random"), r"space.tau: .*tau` to be in \(0, 1\)"),
    (with_(space={"sigma": {"uniform": [10, 100]}}, method={"name": "gradual_construction"}, search="random"),
     r"space.sigma: .*integer; use randint or grid"),
    (with_(space={"lam": {"grid": [0.1], "choice": [1.0]}}), r"space.lam: .*exactly one of"),
    (with_(space={"lam": {"loguniform": [0.0, 1.0]}}, search="random"), r"space.lam: .*low > 0"),
    (with_(space={"lam": {"uniform": [1.0, 0.5]}}, search="random"), r"space.lam: .*low < high"),
    (with_(space={"sigma": {"grid": [10]}}), r"space.sigma: also fixed in method.params"),
    (with_(num_samples=3), r"num_samples: .*expected 1, got 3"),
    (with_(method={"name": "gc"}), r"method.name: unknown method 'gc'"),
    (with_(method={"name": "aip"}, space={"alpha": {"grid": [1.0]}}), r"method: 'aip' needs a generative model"),
    (with_(resources={"cpu": 0}), r"resources.cpu: Input should be greater than 0"),
    (with_(validity_floor=1.5), r"validity_floor: Input should be less than or equal to 1"),
    (with_(colour="red"), r"colour: Extra inputs are not permitted"),
    (with_(name="a b"), r"name: String should match pattern"),
])
def test_invalid_specs_name_the_field(data, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(SweepSpec, data, source="s.yaml")


def test_random_search_samples_count_the_trials():
    spec = parse_spec(SweepSpec, with_(search="random", num_samples=7,
                                       space={"lam": {"loguniform": [0.01, 1.0]}, "tau": {"grid": [0.5, 0.9]}}))
    assert spec.expected_trials() == 14  # Tune crosses the grid with num_samples draws


def test_spec_hash_ignores_placement():
    a = parse_spec(SweepSpec, BASE)
    b = parse_spec(SweepSpec, with_(output="/elsewhere", resources={"cpu": 2}, max_concurrent_trials=1, examples=0))
    c = parse_spec(SweepSpec, with_(seed=1))
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


def test_cli_sweep_error_exits_2_naming_the_field(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("output: x\ndataset: {name: breast_cancer}\nfleet: [{id: m, train: {arch: mlp}}]\n"
                    "method: {name: wachter}\nspace: {lambda: {grid: [1]}}\nobjectives: [{metric: l0, mode: min}]\n")
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "cfaudit sweep: error:" in err and "space.lambda: not a config field of 'wachter'" in err

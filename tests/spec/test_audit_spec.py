import pytest

from engine.cli import demo_spec_path
from engine.spec import AuditSpec, SpecError, load_spec, parse_spec

BASE = {
    "output": "memory://x",
    "dataset": {"name": "shapes"},
    "fleet": [{"id": "m1", "train": {"arch": "cnn"}}],
    "methods": [{"name": "wachter"}],
}


def with_(**changes):
    return {**BASE, **changes}


def test_demo_spec_is_valid():
    spec = load_spec(AuditSpec, demo_spec_path())
    assert len(spec.fleet) >= 3
    assert {m.name for m in spec.methods} == {"gradual_construction", "wachter"}
    assert spec.queries.count >= 200


@pytest.mark.parametrize("data, match", [
    (with_(colour="red"), r"colour: Extra inputs are not permitted"),
    (with_(seed="abc"), r"seed: .*integer"),
    ({k: v for k, v in BASE.items() if k != "output"}, r"output: Field required"),
    (with_(methods=[{"name": "nope"}]), r"unknown method 'nope'"),
    (with_(methods=[{"name": "wachter", "params": {"bogus": 1}}]), r"Unknown parameter\(s\) \['bogus'\]"),
    (with_(methods=[{"name": "wachter", "params": {"max_iter": "many"}}]), r"wachter.max_iter.*number"),
    (with_(fleet=[{"id": "m1"}]), r"exactly one of `train`"),
    (with_(fleet=[{"id": "m 1", "train": {}}]), r"fleet\[0\].id: String should match pattern"),
    (with_(fleet=[{"id": "a", "train": {}}, {"id": "a", "train": {}}]), r"unique.*\['a'\]"),
    (with_(targets=-1), r"must be >= 0"),
    (with_(queries={"count": 0}), r"queries.count: Input should be greater than 0"),
    (with_(runtime={"batch_size": -5}), r"runtime.batch_size"),
    (with_(fleet=[{"id": "u", "path": "m.pt", "format": "state_dict"}]), r"needs `factory"),
])
def test_invalid_specs_name_the_field(data, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(AuditSpec, data, source="x.yaml")


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\nfleet: [\n  - id: x\n")
    with pytest.raises(SpecError, match=r"bad.yaml: YAML syntax error at line \d+, column \d+"):
        load_spec(AuditSpec, path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="Spec file not found"):
        load_spec(AuditSpec, tmp_path / "none.yaml")


def test_spec_hash_ignores_placement_only():
    a = parse_spec(AuditSpec, BASE)
    b = parse_spec(AuditSpec, with_(output="memory://elsewhere", runtime={"num_actors": 5}))
    c = parse_spec(AuditSpec, with_(seed=1))
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()

"""The spec loader refuses YAML aliases (a "billion laughs" spec) and loads every other spec as yaml.safe_load."""
import time

import pytest
import yaml

from engine.cli import demo_spec_path
from engine.spec import AuditSpec, SpecError, load_spec
from engine.spec.loading import read_yaml

# Nine levels of nine aliases: 9**9 (387 million) "lol"s under dataset.options once expanded, in under 1 kB.
LAUGHS = "\n".join(["a0: &a0 lol"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)])
SPEC = """\
name: laughs
output: memory://laughs
dataset:
  name: shapes
  options:
    {laughs}
fleet: [{{id: m1, train: {{arch: cnn}}}}]
methods: [{{name: wachter}}]
"""


def test_a_billion_laughs_spec_is_refused_at_its_first_alias(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(SPEC.format(laughs=LAUGHS.replace("\n", "\n    ")))
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        load_spec(AuditSpec, path)
    assert time.perf_counter() - start < 1.0
    # a1's first alias: line 7 of the file (a0 is on line 6), after "    a1: &a1 [".
    assert str(caught.value) == (f"{path}: YAML alias *a0 at line 7, column 14: anchors/aliases (`&name` / `*name`) "
                                 "are not allowed in cfaudit specs; write the repeated value out in full")


@pytest.mark.parametrize("text, where", [
    ("base: &b {x: 1}\nother: *b\n", "alias *b at line 2, column 8"),
    ("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n", "alias *b at line 3, column 7"),  # a merge key is an alias too
    ("- &s 1\n- [*s, *s]\n", "alias *s at line 2, column 4"),
])
def test_every_alias_is_refused_with_its_position(text, where):
    with pytest.raises(SpecError) as caught:
        read_yaml(text, "x.yaml")
    assert str(caught.value).startswith(f"x.yaml: YAML {where}: anchors/aliases (`&name` / `*name`) are not allowed")


def test_specs_without_aliases_load_as_before(tmp_path):
    text = demo_spec_path().read_text()
    assert read_yaml(text, "demo.yaml") == yaml.safe_load(text)
    odd = "a: &unused 1\nb: '*not an alias'\nc: [1, 2.5, null, true, '&x']\nd: {e: f}\n"  # an anchor alone is kept
    assert read_yaml(odd, "odd.yaml") == yaml.safe_load(odd)
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    assert load_spec(AuditSpec, path) == load_spec(AuditSpec, demo_spec_path())


def test_a_syntax_error_still_names_its_position():
    with pytest.raises(SpecError, match=r"^s\.yaml: YAML syntax error at line 2, column 1: "):
        read_yaml("a: [1,\n}", "s.yaml")

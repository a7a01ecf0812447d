"""The README's "When things go wrong" catalogue, one case per row: each bad input given to `cfaudit audit`
as a user would run it exits with status 2, a message naming the culprit and what was expected, and no
results, reports or job marker written (nothing partial is ever visible). Rows tested elsewhere name their
test in the README; `test_every_readme_row_has_a_test` keeps the table and the tests in step."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from engine.cli import main
from tests.fixtures.s3 import tiny_audit_spec

README = Path(__file__).resolve().parents[2] / "README.md"


# --- models the cases load from files --------------------------------------------------------------------
class FixedInput(nn.Module):
    """A classifier that only takes [B, channels, size, size] (a Linear over the flattened image)."""

    def __init__(self, channels: int, size: int, classes: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(channels * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class NanOnRed(nn.Module):
    """Finite logits for a dummy input, NaN for images whose red channel dominates (real shapes queries)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = (x[:, 0] - x[:, 2]).mean((1, 2))
        logits = torch.stack([red, -red], 1)
        return torch.where((red > 0.05)[:, None], torch.full_like(logits, float("nan")), logits)


class SmallDecoder(nn.Module):
    """A generator whose samples are 1 x 8 x 8 (the classifiers take 3 x 32 x 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(z)).view(-1, 1, 8, 8)


def _script(module: nn.Module, path: Path) -> str:
    """A user's TorchScript file: its spec entry needs `trust: true`."""
    torch.jit.script(module).save(str(path))
    return str(path)


# --- the cases: (id, build(spec, tmp) -> spec or a YAML text, expected message) ---------------------------
def _fleet_file(spec: dict, path: str, **more) -> dict:
    spec["fleet"] = [{"id": "user-cnn", "path": path, **more}]
    return spec


def _write_csv(tmp: Path, rows: str) -> str:
    path = tmp / "table.csv"
    path.write_text("a,b,label\n" + rows)
    return str(path)


def _image_parquet(tmp: Path, labels: list[int]) -> str:
    """A Parquet file of PNG-encoded 8x8 RGB images with integer labels."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(i: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    path = tmp / "images.parquet"
    pq.write_table(pa.table({"image": [png(i) for i in range(len(labels))], "label": labels}), path)
    return str(path)


def _tabular(spec: dict, path: str, **options) -> dict:
    spec["dataset"] = {"name": "tabular", "options": {"path": path, "label_column": "label", **options}}
    spec["fleet"] = [{"id": "mlp", "train": {"arch": "mlp", "epochs": 1}}]
    spec["queries"] = {"count": 4}
    return spec


def _set(path: str, value) -> Callable[[dict, Path], dict]:
    def build(spec: dict, tmp: Path) -> dict:
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]
        if value is DELETE:
            node.pop(leaf)
        elif leaf.isdigit():
            node[int(leaf)] = value
        else:
            node[leaf] = value
        return spec
    return build


DELETE = object()

CASES: list[tuple[str, Callable, str]] = [
    # specs
    ("spec-unknown-field", _set("colour", "red"), r"colour: Extra inputs are not permitted"),
    ("spec-wrong-type", _set("queries.count", "many"), r"queries\.count: Input should be a valid integer.*'many'"),
    ("spec-missing-field", _set("output", DELETE), r"invalid spec\n  output: Field required"),
    ("spec-unknown-method", _set("methods", [{"name": "gradual"}]),
     r"methods\[0\]\.name: unknown method 'gradual'; expected one of \[.*'gradual_construction'"),
    ("spec-unknown-method-parameter", _set("methods", [{"name": "wachter", "params": {"lamda": 1}}]),
     r"methods\[0\]\.params: Unknown parameter\(s\) \['lamda'\] for method 'wachter'; expected some of \[.*'lam'"),
    ("spec-unknown-architecture", _set("fleet", [{"id": "m", "train": {"arch": "resnet"}}]),
     r"fleet\[0\]\.train\.arch: Input should be 'cnn', 'mlp' or 'text_cnn'"),
    ("spec-unknown-reference-model", _set("metrics.reference_model", "nope"),
     r"metrics\.reference_model: expected one of the fleet ids \['cnn'\], got 'nope'"),
    ("spec-method-needs-generator", _set("methods", [{"name": "xgem"}]),
     r"methods\[0\]: 'xgem' needs a generative model; add a `generator` entry"),
    ("spec-method-not-applicable", lambda s, t: {**s, "methods": [{"name": "aip"}],
                                                 "generator": {"kind": "vae", "train": {"epochs": 1}}},
     r"methods\[0\]: 'aip' edits the attributes of an attribute-informed generator.*kind 'vae' has none"),
    ("spec-target-out-of-range", _set("targets", 7),
     r"targets: class 7 is out of range for a classifier with 2 classes \(model 'cnn'\)"),
    ("spec-zero-budget", _set("methods", [{"name": "wachter", "params": {"max_iter": 0}}]),
     r"methods\[0\]\.params: Expected `wachter\.max_iter` to be an integer >= 1 but got 0"),
    ("spec-negative-count", _set("queries.count", -5), r"queries\.count: Input should be greater than 0"),
    ("spec-yaml-syntax", lambda s, t: "name: tiny\nqueries: {count: 3\nmethods: []\n",
     r"YAML syntax error at line \d+, column \d+"),
    # data
    ("data-missing-file", lambda s, t: {**s, "dataset": {"name": "parquet_images",
                                                         "options": {"path": str(t / "absent.parquet")}}},
     r"parquet_images: file .*absent\.parquet \(option 'path'\) does not exist"),
    ("data-unreadable-parquet", lambda s, t: (t / "junk.parquet").write_bytes(b"not parquet at all") and {
        **s, "dataset": {"name": "parquet_images", "options": {"path": str(t / "junk.parquet")}}},
     r"parquet_images .*junk\.parquet \(option 'path'\): cannot be read as Parquet: .*magic bytes not found"),
    ("data-non-finite-features", lambda s, t: _tabular(s, _write_csv(t, "1,2,0\n3,inf,1\n" * 20)),
     r"tabular .*table\.csv: feature columns \['b'\] hold NaN or infinite values"),
    ("data-empty-selection", _set("queries", {"count": 5, "classes": []}),
     r"queries: no shapes samples match classes=\[\]"),
    ("data-labels-out-of-range", lambda s, t: {**s, "dataset": {"name": "parquet_images", "options": {
        "path": _image_parquet(t, labels=[0, 1, 5, 1]), "class_names": ["cat", "dog"]}}},
     r"images\.parquet column 'label': integer labels must be in \[0, 2\)"),
    ("data-confounder-not-an-attribute", _set("dataset.options.confounder", "hat"),
     r"shapes: option 'confounder' must be one of \[.*'marker'.*\], got 'hat'"),
    ("data-wrong-channels", lambda s, t: _fleet_file(s, _script(FixedInput(1, 32), t / "gray.pt"), trust=True),
     r"'user-cnn' failed on a dummy input of shape \[1, 3, 32, 32\]"),
    # models
    ("model-missing-file", lambda s, t: _fleet_file(s, str(t / "gone.pt")), r"Model file not found: .*gone\.pt"),
    ("model-pickle-refused", lambda s, t: torch.save(FixedInput(3, 32), t / "full.pt") or
     _fleet_file(s, str(t / "full.pt")),
     r"model 'user-cnn': .*full\.pt is a pickle of Python objects.*can execute code from the file\. Set `trust: true`"),
    ("model-wrong-input-shape", lambda s, t: _fleet_file(s, _script(FixedInput(3, 16), t / "small.pt"), trust=True),
     r"'user-cnn' failed on a dummy input of shape \[1, 3, 32, 32\]"),
    ("model-wrong-class-count", lambda s, t: _fleet_file(s, _script(FixedInput(3, 32, 3), t / "three.pt"), trust=True),
     r"'user-cnn' returned shape \[1, 3\].*expected \[1, 2\]"),
    ("model-nan-logits", lambda s, t: {**_fleet_file(s, _script(NanOnRed(), t / "nan.pt"), trust=True),
                                       },
     r"model 'user-cnn' returned NaN or inf logits on query ids \[\d+"),
    ("model-generator-shape", lambda s, t: {**s, "methods": [{"name": "xgem", "params": {"max_iter": 5}}],
                                            "generator": {"kind": "vae", "path": _script(SmallDecoder(), t / "g.pt"),
                                                          "latent_dim": 4, "trust": True}},
     r"generator 'generator-vae' decodes to shape \[1, 8, 8\], but the classifiers take \[3, 32, 32\]"),
    # storage
    ("storage-other-spec", lambda s, t: (t / "out").mkdir() or (t / "out" / "_job.json").write_text(
        '{"name": "other", "spec_hash": "0123abcd"}') and s,
     r"holds results of a different spec \('other', hash 0123abcd\); choose another output or set `overwrite: true`"),
]


def _run(tmp_path: Path, build: Callable, capsys) -> tuple[int, str]:
    spec = tiny_audit_spec(str(tmp_path / "out"))
    spec["targets"] = "second"
    built = build(spec, tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(built if isinstance(built, str) else yaml.safe_dump(built))
    code = main(["audit", str(path)])
    return code, capsys.readouterr().err


def _written(out: Path) -> list[str]:
    """Whatever the job left in its output (the storage case's own planted marker aside)."""
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "_job.json"
                  or p.name == "_job.json" and "other" not in p.read_text())


@pytest.mark.parametrize("case_id, build, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_writes_nothing(case_id, build, message, tmp_path, capsys):
    code, err = _run(tmp_path, build, capsys)
    assert code == 2, err
    assert err.startswith("cfaudit audit: error: "), err
    assert re.search(message, err), f"{case_id}: expected /{message}/ in\n{err}"
    assert "Traceback" not in err and "most recent call last" not in err
    assert _written(tmp_path / "out") == []


def test_every_readme_row_has_a_test():
    """Each row of the README table names a case here or a test function that exists."""
    text = README.read_text()
    section = text.split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Bad input")
            and not set(line) <= set("|- ")]
    assert len(rows) >= 20
    ids = {c[0] for c in CASES}
    root = README.parent
    for row in rows:
        test = row.rstrip(" |").rsplit("|", 1)[1].strip().strip("`")
        if test in ids:
            continue
        file, _, name = test.partition("::")
        assert (root / file).is_file() and re.search(rf"def {re.escape(name)}\(", (root / file).read_text()), row
    assert ids <= set(re.findall(r"`([a-z0-9-]+)`", section)), sorted(ids - set(re.findall(r"`([a-z0-9-]+)`", section)))


def test_a_sweep_refuses_a_bad_target_before_tune_starts(tmp_path, capsys):
    """The sweep job runs the same dry run: an out-of-range target is refused before Ray and Tune start."""
    spec = tiny_audit_spec(str(tmp_path / "out"))
    spec.pop("methods")
    spec.pop("runtime")
    spec.update(targets=7, method={"name": "wachter", "params": {"max_iter": 5}},
                space={"lam": {"grid": [0.1, 1.0]}},
                objectives=[{"metric": "flip_ratio", "mode": "max"}, {"metric": "mean_l2", "mode": "min"}])
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 2
    err = capsys.readouterr().err
    assert "targets: class 7 is out of range for a classifier with 2 classes (model 'cnn')" in err, err
    assert _written(tmp_path / "out") == []

"""Safe defaults, checked: user strings render as text in the dashboard, nothing is written outside the
output root, the local Ray listens on loopback only and its dashboard refuses requests without the token.
(Credentials never reaching outputs or logs: tests/runtime/test_s3.py::test_credentials_appear_nowhere_the_job_wrote.)"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.report.bias import write_reports
from engine.report.dashboard import render_dashboard
from engine.report.summary import write_summary
from engine.store.results import shard_uri
from engine.store.uri import join, write_bytes_atomic
from tests.fixtures.results import SPEC_HASH, commit_shard, images_parquet

ROOT = Path(__file__).resolve().parents[2]
EVIL_MODEL = "<img src=x onerror=alert(1)>"
EVIL_CLASSES = ["<script>alert(2)</script>", "dog & \"cat\""]
EVIL_ATTRIBUTE = "<b onmouseover=alert(3)>marker</b>"
N = 6


@pytest.fixture(scope="module")
def evil_dashboard(tmp_path_factory, confounded_cnn, shapes_oracle, shapes_biased_train, shapes_test):
    """A real GC shard whose model id, class names (from the user's Parquet) and oracle attribute are markup."""
    out = tmp_path_factory.mktemp("evil")
    data = out / "<i>faces<i>.parquet"
    images_parquet(data, shapes_test.x[:N], shapes_test.y[:N])
    names = list(shapes_oracle.class_names)
    oracle = dataclasses.replace(shapes_oracle, class_names=[EVIL_ATTRIBUTE if n == "marker" else n for n in names])
    bundle = ModelBundle(classifier=confounded_cnn, oracle=oracle, reference=shapes_biased_train)
    meta = {"job": "evil", "spec_hash": "h", "model_id": EVIL_MODEL, "method": "gradual_construction",
            "config_hash": "c", "unit_id": "u0"}
    table = explain_unit(make_method("gradual_construction", {"sigma": 20}), bundle, shapes_test.x[:N],
                         torch.arange(N), shapes_test.y[:N], "flip", seed=0, meta=meta,
                         metrics=MetricOptions(confounders=(EVIL_ATTRIBUTE,), deletion_steps=0))
    commit_shard(str(out), EVIL_MODEL, "gradual_construction", 0, table)
    spec = {"name": "evil", "dataset": {"name": "parquet_images", "options": {
        "path": str(data), "split_column": "split", "class_names": EVIL_CLASSES}},
        "queries": {"split": "test"}, "metrics": {"confidence": 0.95, "bootstrap_samples": 50,
                                                   "confounders": [EVIL_ATTRIBUTE]}}
    write_bytes_atomic(join(str(out), "_job.json"), json.dumps({"spec": spec, "spec_hash": SPEC_HASH}).encode())
    write_reports(str(out), summary=write_summary(str(out), 0.95, 50))
    return Path(render_dashboard(str(out), max_examples=4)).read_text()


class Tags(HTMLParser):
    """The element names a browser would build from the page, and any on* attributes they carry."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.handlers: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.names.add(tag)
        self.handlers += [(tag, name) for name, _ in attrs if name.lower().startswith("on")]


def test_dashboard_escapes_every_user_string(evil_dashboard):
    page = evil_dashboard
    tags = Tags()
    tags.feed(page)
    assert "script" not in tags.names  # the page has no scripts of its own, and none got in
    assert tags.handlers == []  # no element carries an event-handler attribute (onerror=, onmouseover=, ...)
    assert {"img", "table"} <= tags.names
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # the model id, shown as text
    assert "&lt;b onmouseover=alert(3)&gt;marker&lt;/b&gt;" in page  # the attribute name, shown as text
    # class names are drawn inside the example images; wherever one appears as text it is escaped
    assert "alert(2)" not in page.replace("&lt;script&gt;alert(2)&lt;/script&gt;", "")


def test_output_paths_cannot_climb_out_of_the_root(tmp_path):
    with pytest.raises(ValueError, match=r"'\.\.' .*writes only inside its output root"):
        join(str(tmp_path), "results", "..", "..", "etc")
    with pytest.raises(ValueError, match=r"contains '\.\.'"):
        shard_uri(str(tmp_path), "../../escaped", "wachter", 0)
    assert join("s3://bucket/out", "results", "model=a..b") == "s3://bucket/out/results/model=a..b"  # not a segment
    assert not (tmp_path.parent / "escaped").exists()


def test_model_ids_and_job_names_cannot_be_paths():
    from engine.spec import AuditSpec, SpecError, parse_spec
    from tests.fixtures.s3 import tiny_audit_spec

    spec = tiny_audit_spec("out")
    spec["fleet"][0]["id"] = "../cnn"
    with pytest.raises(SpecError, match=r"fleet\[0\]\.id: String should match pattern"):
        parse_spec(AuditSpec, spec)


@pytest.mark.ray
def test_local_ray_listens_on_loopback_and_its_dashboard_needs_the_token():
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    run = subprocess.run([sys.executable, "-m", "tests.hardening.ray_probe"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["dashboard"].startswith("127.0.0.1:")
    assert report["anonymous"] == 401 and report["with_token"] == 200
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
    assert report["listening"] and all(a.startswith(loopback) for a in report["listening"]), report["listening"]


def test_a_secret_in_a_spec_is_never_echoed_in_its_error(tmp_path, capsys):
    """A key pasted into a field that does not exist (or has the wrong type) is refused without repeating it."""
    import yaml

    from engine.cli import main
    from tests.fixtures.s3 import tiny_audit_spec

    spec = tiny_audit_spec(str(tmp_path / "out"))
    spec["aws_secret_access_key"] = "wJalrXUtnFEMI-K7MDENG"
    spec["dataset"]["options"]["api_token"] = ["wJalrXUtnFEMI-K7MDENG"]
    spec["runtime"]["access_key"] = "AKIAIOSFODNN7EXAMPLE"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["audit", str(tmp_path / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert "aws_secret_access_key: Extra inputs are not permitted (value hidden" in err
    assert "wJalrXUtnFEMI" not in err and "AKIAIOSFODNN7" not in err
    assert not (tmp_path / "out").exists()

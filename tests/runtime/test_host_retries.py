"""A unit that raises an error a re-run may change is re-run up to runtime.max_retries times; a deterministic one
(and one that fails every time) is reported with its error."""
import polars as pl
import pytest

from engine.data import load_dataset
from engine.runtime.host import ModelHost
from engine.runtime.plan import plan_units, select_queries, unit_row
from engine.spec import AuditSpec, parse_spec
from engine.store.commit import Claim
from engine.store.results import finished_units, result_files
from engine.store.uri import write_bytes_atomic
from engine.workflows.audit import write_failures
from tests.fixtures.s3 import tiny_audit_spec


@pytest.fixture(scope="module")
def host_and_row(tmp_path_factory, confounded_cnn):
    spec = parse_spec(AuditSpec, {**tiny_audit_spec(str(tmp_path_factory.mktemp("retries"))),
                                  "runtime": {"batch_size": 10, "max_retries": 2}})
    data = load_dataset(spec.dataset.name, spec.queries.split, **spec.dataset.options)
    unit = plan_units(spec, select_queries(data, spec.queries.count, spec.queries.seed))[0]
    write_bytes_atomic(f"{spec.output}/_job.json", ('{"spec_hash": "%s"}' % spec.spec_hash()).encode())
    claim = Claim(spec.output, "retries-run").acquire()
    yield spec, ModelHost(spec.model_dump(mode="json"), run_id=claim.run_id), unit_row(unit, data)
    claim.release()


def test_a_transient_failure_is_retried_and_written_once(host_and_row, monkeypatch):
    spec, host, row = host_and_row
    real, calls = host.run_unit, []

    def flaky(r):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("worker hiccup")
        return real(r)

    monkeypatch.setattr(host, "run_unit", flaky)
    result = host({k: [v] for k, v in row.items()})
    assert result["error"].tolist() == [""] and result["attempts"].tolist() == [2] and len(calls) == 2
    assert finished_units(spec.output) == {("cnn", "wachter", 0)}
    assert pl.read_parquet(result_files(spec.output))["query_id"].n_unique() == 10  # one copy of each row


def test_a_unit_failing_every_retry_is_reported_with_its_error(host_and_row, monkeypatch, tmp_path):
    spec, host, row = host_and_row
    calls = []

    def broken(r):
        calls.append(1)
        raise OSError("storage keeps timing out")

    monkeypatch.setattr(host, "run_unit", broken)
    result = host({k: [v] for k, v in row.items()})
    assert len(calls) == 3 and result["attempts"].tolist() == [3]
    assert result["error"][0].startswith("OSError: storage keeps timing out")
    write_failures(str(tmp_path), [(row["unit_id"], result["error"][0])])
    failures = pl.read_parquet(tmp_path / "reports" / "failures.parquet")
    assert failures["unit_id"].to_list() == ["cnn/wachter/00000"] and "timing out" in failures["error"][0]


def test_a_deterministic_error_is_reported_at_once(host_and_row, monkeypatch):
    # Old: IndexError from a metric was retried three times with the same outcome.
    _, host, row = host_and_row
    calls = []

    def broken(r):
        calls.append(1)
        raise IndexError("min(): Expected reduction dim 1 to have non-zero size")

    monkeypatch.setattr(host, "run_unit", broken)
    result = host({k: [v] for k, v in row.items()})
    assert len(calls) == 1 and result["attempts"].tolist() == [1]
    assert result["error"][0].startswith("IndexError: min()")

"""The GPU check runs on a CPU at a tiny size: the same table and JSON, "cpu" and no GPU memory."""
import json

import pytest
import torch

from engine.workflows.gpu_check import Budget, CheckConfig, format_table, gpu_check
from jobs.gpu_check import main

TINY = ["--gc-sigma", "5", "--gc-max-features", "4", "--wachter-max-iter", "100"]
TINY_PARAMS = {"gradual_construction": {"sigma": 5, "block_size": 4, "max_features": 4}, "wachter": {"max_iter": 100}}


@pytest.fixture
def torch_threads():
    """The CLI sets the driver's torch threads (half the cores); the suite runs on one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_direct_run_on_cpu_writes_rates_and_valid_wachter(tmp_path, capsys, torch_threads):
    out = tmp_path / "gpu_check.json"
    assert main(["--device", "cpu", "--no-audit", "--batches", "4", "8", *TINY, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["gpu_total_mib"] is None
    assert report["params"]["wachter"] == {"max_iter": 100}  # the demo's max_iter 300, capped by the flag
    rows = {(r["method"], r["queries"]): r for r in report["direct"]}
    assert set(rows) == {(m, n) for m in ("gradual_construction", "wachter") for n in (4, 8)}
    for row in rows.values():
        assert row["cf_per_min"] > 0 and row["method_cf_per_min"] >= row["cf_per_min"]
        assert row["peak_gpu_mib"] is None and 0.0 <= row["validity"] <= 1.0
    assert rows[("wachter", 8)]["valid"] > 0
    assert report["hosts"] == [] and report["best_hosts"] is None
    printed = capsys.readouterr().out
    assert "gpu check on cpu" in printed and "direct  wachter" in printed and "n/a" in printed


@pytest.mark.ray
def test_audit_path_runs_the_same_work_with_one_host(local_ray):
    lines = []
    report = gpu_check(CheckConfig(device="cpu", params=TINY_PARAMS, batches=(4,), hosts=(1,), audit_queries=8,
                                   audit_batch=4), log=lines.append)
    (row,) = report["hosts"]
    assert row["hosts"] == 1 and row["gpus_per_host"] == 0 and row["peak_gpu_mib"] is None
    assert row["units_failed"] == 0 and row["units_done"] == 4 and row["done"] == 16  # 2 methods x 2 units of 4
    assert row["cf_per_min"] > 0 and row["seconds"] > 0
    assert all(r["cf_per_min"] > 0 for r in report["direct"])
    assert report["best_hosts"] == 1 and "best hosts per device: 1" in format_table(report)
    assert any("audit, 1 host(s):" in line for line in lines)


def test_a_run_past_the_budget_is_skipped_and_said_so():
    budget = Budget(10.0)
    assert budget.skip_reason(None) is None and budget.skip_reason(1.0) is None
    assert budget.skip_reason(60.0).startswith("skipped: needs ~60s")
    budget.start -= 11
    assert budget.skip_reason(None) == "skipped: the 10s budget is spent"


def test_bad_settings_are_value_errors_naming_the_field():
    with pytest.raises(ValueError, match="batches: expected integers >= 1"):
        CheckConfig(batches=(0,))
    with pytest.raises(ValueError, match="params: expected methods among"):
        CheckConfig(params={"fgsm": {}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_fails_clearly(tmp_path, capsys, torch_threads):
    assert main(["--device", "cuda", "--no-audit", "--out", str(tmp_path / "r.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err

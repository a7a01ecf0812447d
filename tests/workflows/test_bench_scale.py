"""The scale benchmarks' pieces: the Hugging Face-style Parquet generator, the TorchScript fleet builder, the
tables read from an audit's account.json, and one tiny `--scale data` run end to end."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.workflows import bench_inputs, bench_scale
from engine.workflows.bench_inputs import build_cnn_fleet, image_rows, write_images_parquet
from engine.workflows.bench_scale import account_row, data_table, fleet_table, growth

ROOT = Path(__file__).resolve().parents[2]


def test_generator_writes_hf_style_parquet_in_batches(tmp_path, monkeypatch):
    from engine.data import load_dataset

    drawn = []
    original = bench_inputs.image_rows
    monkeypatch.setattr(bench_inputs, "image_rows", lambda start, count, *a: drawn.append(count) or original(
        start, count, *a))
    paths = write_images_parquet(tmp_path / "a", 250, batch_rows=40, rows_per_file=100)
    assert [Path(p).name for p in paths] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert max(drawn) == 40 and sum(drawn) == 250  # never more than one batch in memory
    groups = [pq.ParquetFile(p).metadata.row_group(g).num_rows for p in paths
              for g in range(pq.ParquetFile(p).metadata.num_row_groups)]
    assert groups == [40, 40, 20] * 2 + [40, 10]
    table = pq.read_table(paths[0])
    assert table.schema.field("image").type.names == ["bytes", "path"] and str(table.schema.field("label").type) == \
        "int64"
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
    assert table.column("image").combine_chunks().field("path")[3].as_py() == "00000003.png"

    train = load_dataset("parquet_images", "train", path=str(tmp_path / "a"))
    test = load_dataset("parquet_images", "test", path=str(tmp_path / "a"))
    assert len(train) + len(test) == 250 and tuple(test.x.shape[1:]) == (3, 64, 64) and set(test.y.tolist()) == {0, 1}
    images, labels = image_rows(0, 250)  # PNG is lossless: the decoded pixels are the generated ones
    decoded = torch.cat([train.x, test.x]).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    assert sorted(map(bytes, decoded)) == sorted(map(bytes, images))
    assert np.bincount(labels).min() > 100  # two balanced classes

    write_images_parquet(tmp_path / "b", 250, batch_rows=100, rows_per_file=250)
    again = pq.read_table(tmp_path / "b")
    assert again.column("image").to_pylist() == pq.read_table(tmp_path / "a").column("image").to_pylist()
    first, _ = image_rows(100, 10)
    assert np.array_equal(first, images[100:110])  # a row depends on its index only, not on the batch


def test_split_column_puts_half_the_rows_in_test(tmp_path):
    from engine.data import load_dataset

    path = bench_inputs.cached_images(tmp_path, 60, size=32, split_column=True)
    test = load_dataset("parquet_images", "test", path=path, split_column="split")
    assert len(test) == 30 and tuple(test.x.shape[1:]) == (3, 32, 32)
    assert bench_inputs.cached_images(tmp_path, 60, size=32, split_column=True) == path  # reused
    assert not list(tmp_path.glob(".tmp-*"))


def test_cnn_fleet_files_are_distinct_and_load_with_trust(tmp_path):
    from engine.models.loading import classifier_handle_from_module, load_module

    entries = build_cnn_fleet(tmp_path, 3)
    assert [e["id"] for e in entries] == ["m00", "m01", "m02"]
    assert all(e["format"] == "torchscript" and e["trust"] is True for e in entries)
    assert all(bench_inputs.model_size_mib(e) > 15 for e in entries)  # big enough for memory to show
    modules = [load_module(e["path"], format="torchscript", trust=True, model_id=e["id"]) for e in entries]
    weights = [torch.cat([p.flatten() for p in m.parameters()]) for m in modules]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    handle = classifier_handle_from_module(modules[0], "m00", [3, 64, 64], ["0", "1"])
    assert handle.predict(torch.rand(2, 3, 64, 64)).shape == (2,)
    with pytest.raises(ValueError, match="trust: true"):
        load_module(entries[0]["path"], model_id="m00")

    stamp = Path(entries[0]["path"]).stat().st_mtime_ns
    again = build_cnn_fleet(tmp_path / "again", 1)  # deterministic: another directory, the same weights
    assert Path(build_cnn_fleet(tmp_path, 1)[0]["path"]).stat().st_mtime_ns == stamp  # cached, not rebuilt
    redone = load_module(again[0]["path"], trust=True)
    assert torch.equal(torch.cat([p.flatten() for p in redone.parameters()]), weights[0])


def _account(driver, hosts, loads, resident=(1, 1), units=4):
    return {"driver_peak_rss_mib": driver,
            "hosts": [{"host": str(i), "pid": 100 + i, "peak_rss_mib": h, "units": units // 2, "model_loads": 1,
                       "peak_resident": r} for i, (h, r) in enumerate(zip(hosts, resident))],
            "model_loads": loads, "models_per_host": 4, "units_done": units, "units_failed": 0,
            "explain_seconds": 3.5}


def test_tables_and_growth_from_hand_written_accounts():
    small = account_row(_account(800.0, [900.0, 950.0], {"m00": 2}), rows=10000, wall_seconds=60.0)
    large = account_row(_account(880.0, [1000.0, 990.0], {"m00": 2}), rows=300000, wall_seconds=90.0)
    assert small["max_host_peak_rss_mib"] == 950.0 and small["host_peak_rss_mib"] == [900.0, 950.0]
    assert growth([large, small], "rows", "driver_peak_rss_mib") == pytest.approx(1.1)
    assert growth([small, large], "rows", "max_host_peak_rss_mib") == pytest.approx(1000 / 950)
    lines = data_table([large, small])
    assert lines[1].split()[:4] == ["10000", "800", "900", "950"] and lines[2].split()[0] == "300000"
    assert lines[-1] == "growth 10000 -> 300000 rows: driver x1.100, max host x1.053 (target <= 1.15: met)"
    worse = dict(large, driver_peak_rss_mib=1000.0)
    assert data_table([small, worse])[-1].endswith("(target <= 1.15: NOT met)")

    base = account_row(_account(700.0, [600.0, 0.0], {"m00": 1}), models=1, wall_seconds=30.0)
    loads = {f"m{i:02d}": 1 for i in range(50)} | {"m07": 2, "m33": 2}
    fleet = account_row(_account(720.0, [650.0, 680.0], loads, resident=(4, 4), units=100), models=50,
                        wall_seconds=200.0)
    assert fleet["model_loads"] == 52 and fleet["loads_per_model"] == pytest.approx(1.04)
    lines = fleet_table([fleet], base, model_mib=16.2, budget=4)
    assert lines[1].split()[:3] == ["1", "600", "-"] and "(baseline)" in lines[1] and lines[2].split()[:7] == ["50", "650", "680", "4", "4", "52", "1.04"]
    assert lines[2].split()[7] == "80"  # max host 680 - baseline max host 600
    assert lines[-1].startswith("budget 4 models per host x 16.2 MiB per model file = 65 MiB")


@pytest.mark.ray
def test_scale_data_end_to_end_prints_peaks_and_growth(tmp_path):
    lines = []
    table = bench_scale.bench_data([600, 300], queries=8, data_dir=tmp_path, batch_size=4, train_steps=0,
                                   command="python -m jobs.bench --scale data --rows 300 600 --queries 8",
                                   log=lines.append)
    assert [r["rows"] for r in table["rows"]] == [300, 600]
    for row in table["rows"]:
        assert row["units_done"] == 2 and row["units_failed"] == 0 and row["explain_seconds"] > 0
        assert len(row["host_peak_rss_mib"]) == 2 and sum(row["host_units"]) == 2  # 2 hosts; one may idle
        assert row["max_host_peak_rss_mib"] > 0 and row["driver_peak_rss_mib"] > 0
    assert set(table["growth"]) == {"driver", "max_host", "target"}
    command = "$ python -m jobs.bench --scale data --rows 300 600 --queries 8"
    assert lines[0] == command and lines.count(command) == 2  # before the progress lines and above the table
    table_lines = lines[len(lines) - lines[::-1].index(command):]
    assert [line.split()[0] for line in table_lines[1:3]] == ["300", "600"]
    assert table_lines[3].startswith("growth 300 -> 600 rows: driver x") and "run max" in table_lines[4]
    assert any(line.startswith("    [explain] done in") for line in lines)  # the audits' stages as progress
    assert (tmp_path / "runs" / "data-600.log").exists()


def test_scale_hosts_interleaves_counts_and_takes_medians(tmp_path, monkeypatch):
    """Runs alternate between host counts (so a noisy spell hits both); speed-up = median run s of 1 / of 2."""
    monkeypatch.setattr(bench_scale, "cached_images", lambda *a, **k: str(tmp_path / "images"))
    monkeypatch.setattr(bench_scale, "build_cnn_fleet", lambda *a, **k: [{"id": "m", "path": "m.pt"}])
    seconds = {(1, 0): 20.0, (2, 0): 11.0, (1, 1): 22.0, (2, 1): 10.0, (1, 2): 18.0, (2, 2): 30.0}
    order = []

    def fake_run(spec, workdir, label, log):
        hosts, repeat = spec["runtime"]["num_actors"], int(label.rsplit("-", 1)[1])
        order.append((hosts, repeat))
        assert spec["methods"] == [{"name": "wachter", "params": {"max_iter": 50}}]
        account = dict(_account(700.0, [600.0] * hosts, {"m": hosts}, units=48), host_run_seconds=seconds[(hosts, repeat)])
        return account, 1.0, 0.0

    monkeypatch.setattr(bench_scale, "run_audit", fake_run)
    lines = []
    table = bench_scale.bench_hosts([2, 1], queries=40, repeats=3, iterations=50, data_dir=tmp_path,
                                    log=lines.append)
    assert order == [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2)]
    one, two = table["rows"]
    assert one["median_run_seconds"] == 20.0 and two["median_run_seconds"] == 11.0
    assert two["speedup"] == pytest.approx(20 / 11) and two["efficiency"] == pytest.approx(20 / 22)
    assert lines[-1].split() == ["2", "48", "11.0", "10.0", "30.0", "11.0", "x1.82", "3.5"]

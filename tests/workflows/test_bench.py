from engine.workflows.bench import bench

SPEC = """
output: memory://bench
dataset: {name: digits}
fleet: [{id: mlp, train: {arch: mlp, epochs: 2}}]
targets: second
methods: [{name: wachter, params: {max_iter: 20}}, {name: fgsm}]
"""


def test_bench_times_batched_and_loop_on_the_same_queries(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(SPEC)
    lines = []
    rows = bench(str(path), None, batch=8, loop_queries=4, repeats=1, device="cpu", log=lines.append)
    assert [r.method for r in rows] == ["wachter", "fgsm"]  # default: every method of the spec
    for r in rows:
        assert r.queries == 8 and r.batched_s_per_cf > 0 and r.loop_s_per_cf > 0
        assert abs(r.ratio - r.loop_s_per_cf / r.batched_s_per_cf) < 1e-9
        assert 0.0 <= r.batched_validity <= 1.0 and 0.0 <= r.loop_validity <= 1.0
    assert any("mean of 4 single calls" in line for line in lines)


def test_runtime_bench_compares_ray_with_direct_on_the_same_units(local_ray):
    from engine.workflows.bench_runtime import run_one

    row = run_one(queries=30, batch_size=10, pool=100)
    assert row["units"] == 3 and row["failed"] == 0 and row["pool"] == 100
    assert row["ray_seconds"] > 0 and row["direct_seconds"] > 0
    assert abs(row["overhead_ratio"] - row["ray_seconds"] / row["direct_seconds"]) < 1e-9
    assert row["driver_peak_rss_mb"] > 0

"""Scale benchmarks (`python -m jobs.bench --scale data|fleet|hosts`): an audit's peak memory, driver and every
model host, as the dataset grows (`data`) and as the fleet grows under `runtime.models_per_host` (`fleet`); and its
throughput as hosts are added to the same job (`hosts`).

Every size runs as a fresh `python -m jobs.audit SPEC.yaml` subprocess, so each peak is that run's own; the
figures come from the `<out>/reports/account.json` the audit writes. The data and models are made as users bring
them (engine/workflows/bench_inputs.py).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from engine.workflows.bench_inputs import build_cnn_fleet, cached_images, default_data_dir, model_size_mib

Log = Callable[[str], Any]
GROWTH_TARGET = 1.15  # the issue's bound on peak memory from the smallest to the largest size


# Account -----------------------------------------------------------------------------------------------------


def read_account(out: os.PathLike) -> dict:
    """<out>/reports/account.json, the audit's own account of its processes' peaks and model loads."""
    path = Path(out) / "reports" / "account.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} was not written: this audit runtime keeps no account (streamed data and "
                                f"model placement, issue #21, write it)")
    return json.loads(path.read_text())


def account_row(account: dict, **extra: Any) -> dict:
    """One table row from an account: the driver's and every host's peak RSS (MiB), model loads and residency."""
    hosts = sorted(account["hosts"], key=lambda h: str(h["host"]))
    loads = sum(account["model_loads"].values())
    models = len(account["model_loads"])
    return {**extra,
            "driver_peak_rss_mib": float(account["driver_peak_rss_mib"]),
            "host_peak_rss_mib": [float(h["peak_rss_mib"]) for h in hosts],
            "max_host_peak_rss_mib": max((float(h["peak_rss_mib"]) for h in hosts), default=0.0),
            "host_units": [int(h["units"]) for h in hosts],
            "peak_resident": [int(h["peak_resident"]) for h in hosts],
            "model_loads": loads, "models_loaded": models,
            "loads_per_model": loads / models if models else 0.0,
            "models_per_host": account.get("models_per_host"),
            "units_done": int(account["units_done"]), "units_failed": int(account["units_failed"]),
            "explain_seconds": float(account["explain_seconds"])}


def growth(rows: list[dict], by: str, key: str) -> float:
    """rows[key] at the largest `by` over rows[key] at the smallest."""
    ordered = sorted(rows, key=lambda r: r[by])
    return ordered[-1][key] / ordered[0][key]


def _mib(values: Sequence[float]) -> str:
    """Peaks in MiB; "-" for a host that ran no unit (it reports no peak)."""
    return " ".join(f"{v:.0f}" if v > 0 else "-" for v in values)


def data_table(rows: list[dict]) -> list[str]:
    """The printed table of `--scale data`, then the growth line."""
    lines = [f"{'rows':>8} {'driver MiB':>10}  {'host MiB (each)':<15} {'run max MiB':>11} {'explain s':>9} "
             f"{'units':>7} {'wall s':>7}"]
    for r in sorted(rows, key=lambda r: r["rows"]):
        units = f"{r['units_done']}/{r['units_done'] + r['units_failed']}"
        lines.append(f"{r['rows']:>8} {r['driver_peak_rss_mib']:>10.0f}  {_mib(r['host_peak_rss_mib']):<15} "
                     f"{r.get('run_max_rss_mib', 0):>11.0f} {r['explain_seconds']:>9.1f} {units:>7} "
                     f"{r['wall_seconds']:>7.0f}")
    if len(rows) > 1:
        sizes = sorted(r["rows"] for r in rows)
        driver, host = growth(rows, "rows", "driver_peak_rss_mib"), growth(rows, "rows", "max_host_peak_rss_mib")
        verdict = "met" if max(driver, host) <= GROWTH_TARGET else "NOT met"
        lines.append(f"growth {sizes[0]} -> {sizes[-1]} rows: driver x{driver:.3f}, max host x{host:.3f} "
                     f"(target <= {GROWTH_TARGET}: {verdict})")
        if all(r.get("run_max_rss_mib") for r in rows):
            run_max = growth(rows, "rows", "run_max_rss_mib")
            lines.append(f"  run max (any process, report stage included) x{run_max:.3f}")
    return lines


def fleet_table(rows: list[dict], baseline: dict, model_mib: float, budget: int) -> list[str]:
    """The printed table of `--scale fleet`: the one-model baseline first, then each fleet size."""
    lines = [f"{'models':>6}  {'host peak MiB':<14} {'resident':<9} {'loads':>5} {'loads/model':>11} "
             f"{'max host - baseline MiB':>23}  {'driver MiB':>10} {'run max MiB':>11} {'explain s':>9} {'units':>7}"]
    for r in [baseline] + sorted(rows, key=lambda r: r["models"]):
        above = r["max_host_peak_rss_mib"] - baseline["max_host_peak_rss_mib"]
        units = f"{r['units_done']}/{r['units_done'] + r['units_failed']}"
        lines.append(f"{r['models']:>6}  {_mib(r['host_peak_rss_mib']):<14} "
                     f"{' '.join(map(str, r['peak_resident'])):<9} {r['model_loads']:>5} "
                     f"{r['model_loads'] / r['models']:>11.2f} "
                     f"{'(baseline)' if r is baseline else f'{above:.0f}':>23}  {r['driver_peak_rss_mib']:>10.0f} "
                     f"{r.get('run_max_rss_mib', 0):>11.0f} "
                     f"{r['explain_seconds']:>9.1f} {units:>7}")
    lines.append(f"budget {budget} models per host x {model_mib:.1f} MiB per model file = {budget * model_mib:.0f} "
                 f"MiB; loads/model target <= 1.2 at the largest fleet")
    return lines


# Runs --------------------------------------------------------------------------------------------------------


def run_audit(spec: dict, workdir: Path, label: str, log: Log) -> tuple[dict, float, float]:
    """`python -m jobs.audit <workdir>/<label>.yaml` in a fresh process: its account, wall seconds and "run max"
    RSS (MiB). Its output goes to <label>.log; the stage lines (`[explain] ...`) are echoed as progress.

    Run max: wait4's ru_maxrss, the largest of the audit process and the descendants it reaped (Ray's, hosts
    included), over the whole run. The account's driver peak is taken when the explain stage ends, so a run max
    well above every peak in the account points at the report stage (or Ray's own processes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(spec["output"], ignore_errors=True)  # else a re-run resumes the last one's units: nothing to run
    spec_path, log_path = workdir / f"{label}.yaml", workdir / f"{label}.log"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log(f"  {label}: python -m jobs.audit {spec_path} (log: {log_path})")
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.audit", str(spec_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        for line in proc.stdout:
            out.write(line)
            if line.startswith("[") or "explain:" in line:
                log(f"    {line.rstrip()}")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"audit {label} exited with {code} after {seconds:.0f} s; the end of {log_path}:\n{tail}")
    account = read_account(spec["output"])
    if not account["hosts"] or account["units_done"] + account["units_failed"] == 0:
        raise RuntimeError(f"audit {label} ran no unit, so its account holds no host peaks; see {log_path}")
    return account, seconds, usage.ru_maxrss / 1024


def _spec(name: str, out: Path, data_path: str, fleet: list[dict], queries: int, batch_size: int,
          hosts: int, runtime: Optional[dict] = None, methods: Optional[list[dict]] = None) -> dict:
    return {"name": name, "output": str(out), "overwrite": True,
            "dataset": {"name": "parquet_images", "options": {"path": data_path}},
            "fleet": fleet, "targets": "flip", "methods": methods or [{"name": "fgsm"}],
            "queries": {"count": queries, "seed": 0}, "metrics": {"fid": {"extractor": "none"}},
            "runtime": {"batch_size": batch_size, "num_actors": hosts, "num_cpus_per_actor": 1, **(runtime or {})}}


def bench_data(sizes: Sequence[int], queries: int = 200, data_dir: Optional[os.PathLike] = None, hosts: int = 2,
               batch_size: int = 50, train_steps: int = 80, command: str = "", log: Log = print) -> dict:
    """`--scale data`: the same audit (one CNN, FGSM, `queries` queries) over generated sets of `sizes` rows."""
    sizes = sorted(set(int(s) for s in sizes))
    for rows in sizes:
        if round(0.2 * rows) < queries:  # parquet_images' default split puts 20% of each class in test
            raise ValueError(f"--rows {rows}: its test split (20%, ~{round(0.2 * rows)} rows) holds fewer than "
                             f"--queries {queries}; give at least {5 * queries} rows")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    log(f"$ {command}" if command else "bench --scale data")
    fleet = build_cnn_fleet(data_dir, 1, width=8, train_steps=train_steps, log=log)
    log(f"model: {fleet[0]['path']} (TorchScript CNN, {train_steps} Adam steps, {model_size_mib(fleet[0]):.1f} MiB); "
        f"fgsm, {queries} queries, {hosts} hosts, units of {batch_size}")
    rows = []
    for n in sizes:
        path = cached_images(data_dir, n, log=log)
        spec = _spec(f"bench-scale-data-{n}", data_dir / "runs" / f"data-{n}", path, fleet, queries, batch_size,
                     hosts)
        account, seconds, run_max = run_audit(spec, data_dir / "runs", f"data-{n}", log)
        rows.append(account_row(account, rows=n, wall_seconds=seconds, run_max_rss_mib=run_max))
        log(f"  {n} rows: driver {rows[-1]['driver_peak_rss_mib']:.0f} MiB, hosts "
            f"{_mib(rows[-1]['host_peak_rss_mib'])} MiB, explain {rows[-1]['explain_seconds']:.1f} s")
    lines = data_table(rows)
    if command:
        log(f"$ {command}")
    for line in lines:
        log(line)
    result = {"command": command, "scale": "data", "queries": queries, "hosts": hosts, "batch_size": batch_size,
              "rows": rows}
    if len(rows) > 1:
        result["growth"] = {"driver": growth(rows, "rows", "driver_peak_rss_mib"),
                            "max_host": growth(rows, "rows", "max_host_peak_rss_mib"), "target": GROWTH_TARGET}
    return result


def bench_fleet(sizes: Sequence[int], models_per_host: int = 4, queries: int = 8,
                data_dir: Optional[os.PathLike] = None, hosts: int = 2, batch_size: int = 4, data_rows: int = 2000,
                command: str = "", log: Log = print) -> dict:
    """`--scale fleet`: fleets of `sizes` TorchScript CNNs under a budget of `models_per_host` resident models per
    host, after a one-model baseline; `queries` per model in units of `batch_size` (two units per model by default,
    so a unit that reaches the wrong host shows as a second load)."""
    sizes = sorted(set(int(s) for s in sizes))
    if not sizes or sizes[0] < 1 or models_per_host < 1:
        raise ValueError(f"Expected --models sizes and --models-per-host >= 1 but got {sizes} and {models_per_host}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    log(f"$ {command}" if command else "bench --scale fleet")
    path = cached_images(data_dir, data_rows, log=log)
    fleet = build_cnn_fleet(data_dir, max(sizes), log=log)
    mib = model_size_mib(fleet[0])
    log(f"models: TorchScript CNNs, random-init (seed = index), {mib:.1f} MiB per file; fgsm, {queries} queries "
        f"per model in units of {batch_size}, {hosts} hosts, models_per_host {models_per_host}")
    rows = []
    for n in [1] + [s for s in sizes if s != 1]:
        spec = _spec(f"bench-scale-fleet-{n}", data_dir / "runs" / f"fleet-{n}", path, fleet[:n], queries, batch_size,
                     hosts, {"models_per_host": models_per_host})
        account, seconds, run_max = run_audit(spec, data_dir / "runs", f"fleet-{n}", log)
        rows.append(account_row(account, models=n, wall_seconds=seconds, run_max_rss_mib=run_max))
        log(f"  {n} models: hosts {_mib(rows[-1]['host_peak_rss_mib'])} MiB, resident "
            f"{rows[-1]['peak_resident']}, {rows[-1]['model_loads']} loads")
    baseline, measured = rows[0], rows[1:]
    lines = fleet_table(measured, baseline, mib, models_per_host)
    if command:
        log(f"$ {command}")
    for line in lines:
        log(line)
    for r in rows:
        r["max_host_minus_baseline_mib"] = r["max_host_peak_rss_mib"] - baseline["max_host_peak_rss_mib"]
    return {"command": command, "scale": "fleet", "models_per_host": models_per_host, "queries": queries,
            "hosts": hosts, "batch_size": batch_size, "model_file_mib": mib, "budget_mib": models_per_host * mib,
            "baseline": baseline, "rows": measured}


def bench_hosts(counts: Sequence[int] = (1, 2), queries: int = 600, batch_size: int = 12, repeats: int = 3,
                iterations: int = 300, data_dir: Optional[os.PathLike] = None, command: str = "",
                log: Log = print) -> dict:
    """`--scale hosts`: the same job (one CNN, Wachter with `iterations` steps, `queries` queries in units of
    `batch_size`) on each count of hosts (1 CPU each), `repeats` fresh runs each, interleaved so that a noisy spell
    of a shared machine hits every count. Throughput = units / the hosts' run seconds (first host ready to last
    result, account.json); the speed-up of each count is its median throughput over the first count's."""
    counts = sorted(set(int(c) for c in counts))
    if not counts or counts[0] < 1 or repeats < 1:
        raise ValueError(f"Expected --hosts counts and --repeats >= 1 but got {counts} and {repeats}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    log(f"$ {command}" if command else "bench --scale hosts")
    path = cached_images(data_dir, 5 * queries, log=log)
    fleet = build_cnn_fleet(data_dir, 1, width=8, train_steps=80, log=log)
    methods = [{"name": "wachter", "params": {"max_iter": iterations}}]
    log(f"wachter ({iterations} iterations), {queries} queries in units of {batch_size}, hosts {counts}, "
        f"{repeats} runs each")
    runs: dict[int, list[dict]] = {c: [] for c in counts}
    for repeat in range(repeats):
        for c in counts:
            label = f"hosts-{c}-{repeat}"
            spec = _spec(f"bench-scale-{label}", data_dir / "runs" / label, path, fleet, queries, batch_size, c,
                         methods=methods)
            account, seconds, _ = run_audit(spec, data_dir / "runs", label, log)
            row = account_row(account, hosts=c, repeat=repeat, wall_seconds=seconds,
                              run_seconds=float(account["host_run_seconds"]))
            runs[c].append(row)
            log(f"  {c} host(s), run {repeat + 1}: hosts ran {row['run_seconds']:.1f} s "
                f"({row['units_done']} units, {row['host_units']} per host)")
    rows = [{"hosts": c, "run_seconds": [r["run_seconds"] for r in runs[c]],
             "median_run_seconds": statistics.median(r["run_seconds"] for r in runs[c]),
             "units": runs[c][0]["units_done"] + runs[c][0]["units_failed"],
             "explain_seconds": statistics.median(r["explain_seconds"] for r in runs[c])} for c in counts]
    for r in rows:
        r["speedup"] = rows[0]["median_run_seconds"] / r["median_run_seconds"]
        r["efficiency"] = r["speedup"] * counts[0] / r["hosts"]  # 1.0: each added host as fast as the first
    if command:
        log(f"$ {command}")
    for line in hosts_table(rows):
        log(line)
    return {"command": command, "scale": "hosts", "queries": queries, "batch_size": batch_size,
            "iterations": iterations, "repeats": repeats, "rows": rows}


def hosts_table(rows: list[dict]) -> list[str]:
    """The printed table of `--scale hosts`: run seconds per repeat, their median, speed-up over the first row."""
    lines = [f"{'hosts':>5} {'units':>6} {'run s (each)':<22} {'median s':>8} {'speed-up':>8} {'explain s':>9}"]
    for r in rows:
        each = " ".join(f"{s:.1f}" for s in r["run_seconds"])
        lines.append(f"{r['hosts']:>5} {r['units']:>6} {each:<22} {r['median_run_seconds']:>8.1f} "
                     f"{'x' + format(r['speedup'], '.2f'):>8} {r['explain_seconds']:>9.1f}")
    return lines

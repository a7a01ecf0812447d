"""`python -m jobs.bench`: batched vs per-query seconds per counterfactual for each method.

Example: python -m jobs.bench --methods gradual_construction wachter --batch 256 --loop-queries 32
The Ray path: python -m jobs.bench --runtime 1000 20000 [--batch 100] (overhead vs direct, driver peak RSS)
Against DiCE (pip install -e '.[dice]'): python -m jobs.bench --peer dice [--queries 50] [--dice-methods ...]
Peak memory as data and fleets grow: python -m jobs.bench --scale data [--rows 10000 100000 300000] [--queries 200]
and python -m jobs.bench --scale fleet [--models 5 50] [--models-per-host 4] [--queries 8] (both [--json FILE])
Throughput as hosts are added: python -m jobs.bench --scale hosts [--hosts 1 2] [--queries 600] [--repeats 3]
"""
import argparse
import json
import sys

from engine.cli import demo_spec_path, set_torch_threads
from engine.workflows.bench import bench


def _write_json(path, table) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(table, f, indent=2)
        print(f"table written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=None,
                        help="job spec giving model, data, settings (default: demo.yaml; tabular.yaml for --peer)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the spec")
    parser.add_argument("--batch", type=int, default=256, help="queries in the batched call")
    parser.add_argument("--loop-queries", type=int, default=32, help="queries timed one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="batched repeats (median reported)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--runtime", nargs="+", type=int, default=None, metavar="QUERIES",
                        help="bench the Ray path at these query counts instead (--batch = unit size)")
    parser.add_argument("--runtime-one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scale", choices=["data", "fleet", "hosts"], default=None,
                        help="peak memory of driver and hosts as the dataset (data) or the fleet (fleet) grows; "
                             "throughput of the same job on more hosts (hosts)")
    parser.add_argument("--rows", nargs="+", type=int, default=[10000, 100000, 300000],
                        help="--scale data: rows of the generated Parquet sets")
    parser.add_argument("--models", nargs="+", type=int, default=[5, 50], help="--scale fleet: fleet sizes")
    parser.add_argument("--models-per-host", type=int, default=4, help="--scale fleet: runtime.models_per_host")
    parser.add_argument("--hosts", nargs="+", type=int, default=[1, 2], help="--scale hosts: host counts")
    parser.add_argument("--data-dir", default=None,
                        help="--scale, --runtime: generated data and models are cached here "
                             "(default: $CFAUDIT_CACHE/bench-scale, else .cfaudit-cache/bench-scale)")
    parser.add_argument("--json", default=None, help="--scale, --runtime: also write the table as JSON here")
    parser.add_argument("--peer", choices=["dice"], default=None,
                        help="compare cfaudit's tabular methods with a peer library on one MLP and one query set")
    parser.add_argument("--queries", type=int, default=None,
                        help="queries: --peer 50 (every method gets the same), --scale data 200, --scale fleet 8, "
                             "--scale hosts 600")
    parser.add_argument("--dice-methods", nargs="+", default=["gradient", "random"],
                        choices=["gradient", "random"], help="--peer dice: DiCE methods to run")
    parser.add_argument("--out", default="cfaudit-out", help="--peer: writes OUT/bench/<peer>.parquet")
    args = parser.parse_args(argv)
    command = " ".join(["python -m jobs.bench", *(argv if argv is not None else sys.argv[1:])])
    if args.runtime_one is not None:  # the subprocess of --runtime: one size, JSON on the last line
        # deferred: each mode loads only what it runs (the --runtime-one subprocess starts fast)
        from engine.workflows.bench_runtime import run_one

        print(json.dumps(run_one(args.runtime_one, args.batch, args.pool, args.data_dir)))
        return 0
    if args.runtime is not None:
        # deferred: each mode loads only what it runs (the --runtime-one subprocess starts fast)
        from engine.workflows.bench_runtime import bench_runtime

        rows = bench_runtime(args.runtime, args.batch, args.data_dir, command=command)
        _write_json(args.json, {"command": command, "runtime": rows})
        return 0
    if args.scale is not None:
        # deferred: each mode loads only what it runs (the --runtime-one subprocess starts fast)
        from engine.workflows.bench_scale import bench_data, bench_fleet, bench_hosts

        set_torch_threads()  # the parent builds the models
        if args.scale == "data":
            queries = 200 if args.queries is None else args.queries
            table = bench_data(args.rows, queries, args.data_dir, command=command)
        elif args.scale == "fleet":
            queries = 8 if args.queries is None else args.queries
            table = bench_fleet(args.models, args.models_per_host, queries, args.data_dir, command=command)
        else:
            queries = 600 if args.queries is None else args.queries
            table = bench_hosts(args.hosts, queries, repeats=args.repeats, data_dir=args.data_dir, command=command)
        _write_json(args.json, table)
        return 0
    set_torch_threads()
    if args.peer == "dice":
        # deferred: each mode loads only what it runs (the --runtime-one subprocess starts fast)
        from jobs.bench_dice import bench_dice

        device = "cpu" if args.device == "auto" else args.device
        queries = 50 if args.queries is None else args.queries
        bench_dice(args.spec, queries, args.dice_methods, args.repeats, device, args.out, command=command)
        return 0
    bench(args.spec or str(demo_spec_path()), args.methods, args.batch, args.loop_queries, args.repeats, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

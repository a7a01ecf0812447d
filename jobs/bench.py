"""`python -m jobs.bench`: batched vs per-query seconds per counterfactual for each method.

Example: python -m jobs.bench --methods gradual_construction wachter --batch 256 --loop-queries 32
The Ray path: python -m jobs.bench --runtime 1000 20000 [--batch 100] (overhead vs direct, driver peak RSS)
Against DiCE (pip install -e '.[dice]'): python -m jobs.bench --peer dice [--queries 50] [--dice-methods ...]
"""
import argparse
import json
import sys

from engine.cli import demo_spec_path, set_torch_threads
from engine.workflows.bench import bench


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
    parser.add_argument("--pool", type=int, default=20000, help=argparse.SUPPRESS)
    parser.add_argument("--peer", choices=["dice"], default=None,
                        help="compare cfaudit's tabular methods with a peer library on one MLP and one query set")
    parser.add_argument("--queries", type=int, default=50, help="--peer: queries (every method gets the same)")
    parser.add_argument("--dice-methods", nargs="+", default=["gradient", "random"],
                        choices=["gradient", "random"], help="--peer dice: DiCE methods to run")
    parser.add_argument("--out", default="cfaudit-out", help="--peer: writes OUT/bench/<peer>.parquet")
    args = parser.parse_args(argv)
    if args.runtime_one is not None:  # the subprocess of --runtime: one size, JSON on the last line
        from engine.workflows.bench_runtime import run_one

        print(json.dumps(run_one(args.runtime_one, args.batch, args.pool)))
        return 0
    if args.runtime is not None:
        from engine.workflows.bench_runtime import bench_runtime

        bench_runtime(args.runtime, args.batch)
        return 0
    set_torch_threads()
    if args.peer == "dice":
        from engine.workflows.bench_dice import bench_dice

        device = "cpu" if args.device == "auto" else args.device
        bench_dice(args.spec, args.queries, args.dice_methods, args.repeats, device, args.out,
                   command=" ".join(["python -m jobs.bench", *(argv if argv is not None else sys.argv[1:])]))
        return 0
    bench(args.spec or str(demo_spec_path()), args.methods, args.batch, args.loop_queries, args.repeats, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

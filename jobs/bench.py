"""`python -m jobs.bench`: batched vs per-query seconds per counterfactual for each method.

Example: python -m jobs.bench --methods gradual_construction wachter --batch 256 --loop-queries 32
"""
import argparse
import sys

from engine.cli import demo_spec_path, set_torch_threads
from engine.workflows.bench import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(demo_spec_path()), help="job spec giving model, data, settings")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the spec")
    parser.add_argument("--batch", type=int, default=256, help="queries in the batched call")
    parser.add_argument("--loop-queries", type=int, default=32, help="queries timed one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="batched repeats (median reported)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    set_torch_threads()
    bench(args.spec, args.methods, args.batch, args.loop_queries, args.repeats, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

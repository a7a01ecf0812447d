"""`python -m jobs.gpu_check`: GC and Wachter counterfactuals per minute on 28x28 images, hosts per GPU, peak memory.

Run once on a GPU machine: python -m jobs.gpu_check [--budget-s 300] [--out gpu_check.json]
It runs on a CPU too (--device cpu): the same table, "cpu" and "n/a" for GPU memory.
Method settings: the demo spec's (GC sigma 30, Wachter max_iter 300) unless --params paper; the --gc-* and
--wachter-* flags cap them further.
"""
import argparse
import json
import os
import sys

from engine.cli import demo_spec_path, set_torch_threads, verbosity_parser
from engine.runtime.cluster import RAY_LOGS_ENV, ray_stderr_filter
from engine.spec import AuditSpec, load_spec
from engine.workflows.gpu_check import METHODS, CheckConfig, format_table, gpu_check


def method_params(args: argparse.Namespace) -> tuple[dict, str]:
    """Method -> params, and a label saying where they came from."""
    if args.params == "demo":
        spec = load_spec(AuditSpec, demo_spec_path())
        params = {m.name: dict(m.params) for m in spec.methods if m.name in METHODS}
        label = "the demo spec's (capped)"
    else:
        params, label = {}, "paper defaults"
    caps = {("gradual_construction", "sigma"): args.gc_sigma,
            ("gradual_construction", "max_features"): args.gc_max_features,
            ("wachter", "max_iter"): args.wachter_max_iter}
    given = {key: value for key, value in caps.items() if value is not None}
    for (method, name), value in given.items():
        params.setdefault(method, {})[name] = value
    if given:
        label += " with " + ", ".join(f"{m}.{n}={v}" for (m, n), v in given.items())
    return params, label


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.gpu_check", description=__doc__.splitlines()[0],
                                     parents=[verbosity_parser()])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="wall-clock budget; a run estimated past what is left is skipped (default %(default)s)")
    parser.add_argument("--params", choices=["demo", "paper"], default="demo",
                        help="method settings: the demo spec's (capped iterations) or the papers' defaults")
    parser.add_argument("--gc-sigma", type=int, default=None, help="cap: GC composition iterations per masking step")
    parser.add_argument("--gc-max-features", type=int, default=None, help="cap: GC masking steps (4x4 blocks)")
    parser.add_argument("--wachter-max-iter", type=int, default=None, help="cap: Wachter Adam steps per query")
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256], help="queries per direct batched call")
    parser.add_argument("--hosts", nargs="+", type=int, default=None,
                        help="hosts sharing the device through the audit (default: 1 2 4 on cuda, 1 2 on cpu)")
    parser.add_argument("--no-audit", action="store_true", help="only the direct runs (Ray is not started)")
    parser.add_argument("--audit-queries", type=int, default=256, help="queries per method through the audit")
    parser.add_argument("--audit-batch", type=int, default=64, help="queries per work unit in the audit")
    parser.add_argument("--cache-dir", default=None, help="model cache (default $CFAUDIT_CACHE or ~/.cache/cfaudit)")
    parser.add_argument("--out", default="gpu_check.json", help="the report as JSON (default %(default)s)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if args.verbose:  # read where Ray starts: Ray's own lines are hidden by default
        os.environ[RAY_LOGS_ENV] = "1"
    set_torch_threads()
    log = (lambda *_: None) if args.quiet else print
    try:
        params, label = method_params(args)
        config = CheckConfig(device=args.device, params=params, params_label=label, batches=tuple(args.batches),
                             hosts=() if args.no_audit else None if args.hosts is None else tuple(args.hosts),
                             audit_queries=args.audit_queries, audit_batch=args.audit_batch, budget_s=args.budget_s,
                             cache_dir=args.cache_dir)
        with ray_stderr_filter(enabled=not args.verbose):
            report = gpu_check(config, log=log, audit_log=print if args.verbose else None)
    except ValueError as err:
        print(f"python -m jobs.gpu_check: error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"report: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

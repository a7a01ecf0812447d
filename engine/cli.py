"""`cfaudit ...`: thin sub-commands that parse, load a spec and call a workflow."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from importlib import resources
from pathlib import Path

from engine.runtime.cluster import RAY_LOGS_ENV, ray_stderr_filter
from engine.store.uri import StorageError

DEFAULT_DEMO_OUT = "cfaudit-out/demo"


def _silent(*_: object) -> None:
    pass


def engine_log(args: argparse.Namespace):
    """Where the engine's stage and progress lines go: stdout, or nowhere with --quiet."""
    return _silent if args.quiet else print


def demo_spec_path() -> Path:
    """The embedded default job spec, shipped as package data of `jobs.specs`."""
    return Path(str(resources.files("jobs") / "specs" / "demo.yaml"))


def with_overrides(spec, output: str | None, overwrite: bool):
    """The spec with the command line's --output / --overwrite applied (when given)."""
    update = {k: v for k, v in {"output": output, "overwrite": overwrite or None}.items() if v}
    return spec.model_copy(update=update) if update else spec


def _audit(args: argparse.Namespace) -> int:
    # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
    from engine.spec import AuditSpec, load_spec
    from engine.workflows.audit import audit

    spec = load_spec(AuditSpec, args.spec)
    spec = with_overrides(spec, args.output, args.overwrite)
    result = audit(spec, log=engine_log(args), progress=not args.quiet, summary=print)
    return 1 if result.units_failed else 0


def _demo(args: argparse.Namespace) -> int:
    # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
    from engine.spec import AuditSpec, load_spec
    from engine.workflows.audit import audit

    spec = load_spec(AuditSpec, demo_spec_path())
    update = {"output": args.out, "overwrite": True}  # the demo's output is its own: replace stale results
    if args.queries:
        update["queries"] = spec.queries.model_copy(update={"count": args.queries})
    spec = spec.model_copy(update=update)
    log = engine_log(args)
    log(f"cfaudit demo: spec {demo_spec_path()}, output {args.out}")
    result = audit(spec, log=log, progress=not args.quiet, summary=print)
    return 1 if result.units_failed else 0


def _train(args: argparse.Namespace) -> int:
    # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
    from engine.workflows.train import train_from_file

    train_from_file(args.spec, log=engine_log(args))
    if args.quiet:
        print(f"cfaudit train: the models of {args.spec} are trained and cached")
    return 0


def _report(args: argparse.Namespace) -> int:
    # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
    from engine.report.bias import audit_settings, fleet_headline, write_reports
    from engine.report.dashboard import render_dashboard
    from engine.report.summary import audit_states, headline, write_summary

    settings, states = audit_settings(args.out), audit_states(args.out)  # the audit's settings; shards read once
    summary = write_summary(args.out, settings["confidence"], settings["bootstrap"], states)
    engine_log(args)(headline(summary))
    print(fleet_headline(write_reports(args.out, summary=summary, states=states)["fleet"]))
    print(f"dashboard: {render_dashboard(args.out)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
    from engine.spec import load_spec
    from engine.spec.sweep import SweepSpec
    from engine.workflows.sweep import sweep

    spec = load_spec(SweepSpec, args.spec)
    spec = with_overrides(spec, args.out, args.overwrite)
    result = sweep(spec, log=engine_log(args), progress=not args.quiet, summary=print)
    return 0 if result.complete and not result.errored else 1


def _augment(args: argparse.Namespace) -> int:
    # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
    from engine.spec import load_spec
    from engine.spec.augment import AugmentSpec

    spec = load_spec(AugmentSpec, args.spec)
    spec = with_overrides(spec, args.output, args.overwrite)
    if args.evaluate:
        # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
        from engine.workflows.augment_eval import evaluate

        evaluate(spec, log=engine_log(args), summary=print)
        return 0
    # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
    from engine.workflows.augment import augment

    result = augment(spec, log=engine_log(args), progress=not args.quiet, summary=print)
    return 1 if result.units_failed else 0


def _schema(args: argparse.Namespace) -> int:
    """Infer (or check) a table's feature schema, print its summary and the YAML to correct."""
    # deferred: a sub-command loads only what it runs (YAML, the tabular readers)
    import yaml

    from engine.data.schema_infer import resolve_schema
    from engine.data.tabular import read_table

    df = read_table(args.table)
    skip = {args.label, args.split_column} - {None}
    missing = sorted(c for c in skip if c not in df.columns)
    if missing:
        raise ValueError(f"{args.table}: columns {missing} not found; columns: {df.columns}")
    schema = resolve_schema(args.schema or "infer", df, [c for c in df.columns if c not in skip], args.table)
    text = yaml.safe_dump(schema.to_mapping(), sort_keys=False, default_flow_style=None, width=110)
    print(schema.describe(), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
        print(f"schema written to {args.out}; correct it and pass it as the dataset option `schema`", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def _methods(args: argparse.Namespace) -> int:
    # deferred: a sub-command loads only its own workflow (torch, Ray, the methods)
    from engine.methods import get_method_class, method_names

    for name in method_names():
        cls = get_method_class(name)
        fields = ", ".join(f"{f.name}={getattr(cls.Config(), f.name)!r}" for f in dataclasses.fields(cls.Config))
        print(f"{name}: {fields}")
    return 0


def verbosity_parser() -> argparse.ArgumentParser:
    """--quiet / --verbose, shared by every sub-command (and so by `python -m jobs.<name>`)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final summary")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also print Ray's own log lines and its workers' output (hidden by default)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfaudit", description="Counterfactual auditing engine")
    sub = parser.add_subparsers(dest="command", required=True)
    common = [verbosity_parser()]
    p = sub.add_parser("demo", parents=common, help="run the embedded default bias audit (jobs/specs/demo.yaml)")
    p.add_argument("--out", default=DEFAULT_DEMO_OUT, help="output URI (default %(default)s)")
    p.add_argument("--queries", type=int, default=None, help="queries per model (default: the spec's)")
    p.set_defaults(run=_demo)
    p = sub.add_parser("audit", parents=common, help="run an audit job spec")
    p.add_argument("spec")
    p.add_argument("--output", default=None, help="override the spec's output URI")
    p.add_argument("--overwrite", action="store_true", help="clear an output holding another spec's results")
    p.set_defaults(run=_audit)
    p = sub.add_parser("train", parents=common, help="train (or fetch from the cache) the models a spec names")
    p.add_argument("spec")
    p.set_defaults(run=_train)
    p = sub.add_parser("report", parents=common,
                       help="recompute the reports of an audit output from its results")
    p.add_argument("out")
    p.set_defaults(run=_report)
    p = sub.add_parser("sweep", parents=common,
                       help="sweep a method's config with Ray Tune; trials, Pareto front and page")
    p.add_argument("spec")
    p.add_argument("--out", "--output", dest="out", default=None, help="override the spec's output URI")
    p.add_argument("--overwrite", action="store_true", help="replace a sweep of the same name made by another spec")
    p.set_defaults(run=_sweep)
    p = sub.add_parser("augment", parents=common,
                       help="generate labelled counterfactual training data (or --evaluate if it helps)")
    p.add_argument("spec")
    p.add_argument("--output", default=None, help="override the spec's output URI")
    p.add_argument("--overwrite", action="store_true", help="clear an output holding another spec's results")
    p.add_argument("--evaluate", action="store_true",
                   help="AIP Table 5 protocol: train from scratch with and without counterfactuals over seeds")
    p.set_defaults(run=_augment)
    p = sub.add_parser("schema", parents=common,
                       help="infer a table's feature schema (types, ranges, categories) to correct")
    p.add_argument("table", help="CSV or Parquet file (local path or URI)")
    p.add_argument("--label", required=True, help="the label column (not a feature)")
    p.add_argument("--split-column", default=None, help="a split column (not a feature)")
    p.add_argument("--schema", default=None, help="a schema file to check and complete instead of inferring all")
    p.add_argument("--out", default=None, help="write the YAML here instead of stdout")
    p.set_defaults(run=_schema)
    p = sub.add_parser("methods", parents=common, help="list the methods and their paper defaults")
    p.set_defaults(run=_methods)
    return parser


def set_torch_threads() -> None:
    """Driver-side torch threads: CFAUDIT_TORCH_THREADS, else half the cores.

    On a small shared machine torch's default (every core) oversubscribes it: training the demo's
    CNN took 114 s with 2 threads against 12 s with 1 on a loaded 2-core machine.
    """
    import torch  # deferred: `cfaudit --help` and argument errors answer without loading torch

    threads = os.environ.get("CFAUDIT_TORCH_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 2) // 2))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = build_parser().parse_args(argv)
    set_torch_threads()
    previous = os.environ.get(RAY_LOGS_ENV)
    if args.verbose:  # read where Ray starts (engine.runtime.cluster): Ray's own lines are hidden by default
        os.environ[RAY_LOGS_ENV] = "1"
    try:
        with ray_stderr_filter(enabled=not args.verbose):
            return args.run(args)
    except (ValueError, FileNotFoundError, StorageError) as err:
        print(f"cfaudit {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if previous is None:
            os.environ.pop(RAY_LOGS_ENV, None)
        else:
            os.environ[RAY_LOGS_ENV] = previous


if __name__ == "__main__":
    sys.exit(main())

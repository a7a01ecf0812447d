"""`python -m jobs.user_fleet [--out DIR] [--queries N] [--audit]`: five user-style models (a normalised CNN, a
one-logit head, an ONNX CNN, scikit-learn gradient boosting and LightGBM on German credit) built from scratch, one
audit spec per dataset that takes them as given, and with --audit both audits run (engine/workflows/user_fleet.py).
"""
import argparse
import sys

from engine.cli import main as cfaudit
from engine.workflows.user_fleet import write_specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.user_fleet", description=__doc__)
    parser.add_argument("--out", default="cfaudit-out/user-fleet")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--audit", action="store_true", help="run both audits after writing the specs")
    args = parser.parse_args(argv)
    specs = write_specs(args.out, args.queries, args.epochs)
    if not args.audit:
        print("run: " + "; ".join(f"cfaudit audit {s}" for s in specs))
        return 0
    return max(cfaudit(["audit", spec]) for spec in specs)


if __name__ == "__main__":
    sys.exit(main())

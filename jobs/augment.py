"""`python -m jobs.augment SPEC.yaml [--evaluate]`: the same as `cfaudit augment ...`."""
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["augment", *sys.argv[1:]]))

"""`python -m jobs.sweep SPEC.yaml [--out URI]`: what `ray job submit` runs; the same as `cfaudit sweep ...`."""
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))

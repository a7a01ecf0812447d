"""`python -m jobs.report ...`: what `ray job submit` runs; the same as `cfaudit report ...`."""
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))

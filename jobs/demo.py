"""`python -m jobs.demo ...`: what `ray job submit` runs; the same as `cfaudit demo ...`."""
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))

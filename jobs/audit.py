"""`python -m jobs.audit ...`: what `ray job submit` runs; the same as `cfaudit audit ...`."""
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))

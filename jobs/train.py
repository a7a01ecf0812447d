"""`python -m jobs.train ...`: what `ray job submit` runs; the same as `cfaudit train ...`."""
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

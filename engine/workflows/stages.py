"""Stage timing for workflows: each stage prints its name and how long it took."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class Stages:
    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            self.log(f"[{name}] done in {self.seconds[name]:.1f}s")

    def report(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return f"stages: {parts}; total {total:.1f}s"

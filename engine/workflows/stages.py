"""Stage timing for workflows: each stage prints its name and how long it took."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from engine.store.commit import read_record
from engine.store.uri import exists, filesystem, join, write_bytes_atomic


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
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.log(f"[{name}] done in {self.seconds[name]:.1f}s")

    def report(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return f"stages: {parts}; total {total:.1f}s"


def claim_directory(directory: str, marker: str, spec: Any, what: str,
                    log: Callable[[str], None] = lambda *_: None) -> None:
    """Refuse to mix a job's output with another spec's: <directory>/<marker> records the spec hash; a
    different hash is an error unless `spec.overwrite`, which clears the directory first."""
    uri = join(directory, marker)
    record = {"name": spec.name, "spec_hash": spec.spec_hash(), "spec": spec.model_dump(mode="json")}
    if exists(uri):
        try:
            previous = read_record(uri, "job record")
        except ValueError:
            if not spec.overwrite:
                raise
            previous = {}
        if previous.get("spec_hash") != record["spec_hash"]:
            if not spec.overwrite:
                raise ValueError(f"{directory!r} holds {what} of a different spec ({previous.get('name')!r}, hash "
                                 f"{previous.get('spec_hash')}); choose another output or set `overwrite: true`")
            fs, path = filesystem(directory)
            fs.rm(path, recursive=True)
            log(f"  overwrite: removed the previous {what} at {directory}")
    write_bytes_atomic(uri, json.dumps(record, indent=2).encode())

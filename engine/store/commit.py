"""The commit protocol of an output (README, "Output integrity").

- **Claim.** One run at a time writes an output: it creates `<out>/_lock.json` exclusively (`O_EXCL` locally, a
  conditional put on object stores that support it) naming its run id, host, process and a heartbeat. A claim
  whose holder is gone (its process dead on this host, or no heartbeat for `LOCK_TTL_S` from elsewhere) is taken
  over; a live one is refused. Hosts check the run id before they write, so a run that lost its claim writes
  nothing more.
- **Commit.** A unit's shard is written whole (atomically), then its manifest entry: the unit's query-id hash,
  the shard's size and SHA-256, the spec hash and the run id. The entry is the commit.
- **Read.** Readers take only shards whose entry is valid and of the output's own spec, and check each shard's
  digest as they read it; a shard that does not match its entry is named, never read as results.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np

from engine.store.uri import exists, filesystem, is_local, join, read_bytes, write_bytes_atomic

LOCK = "_lock.json"
LOCK_TTL_S = 180.0          # a claim not refreshed for this long, from another host, is stale
HEARTBEAT_S = 30.0          # how often a running job refreshes its claim
ENTRY_KEYS = ("unit_id", "model_id", "method", "part", "queries", "n", "size", "sha256", "spec_hash", "run_id")
_ENTRY_PATH = re.compile(r"model=([^/]+)/method=([^/]+)/part-(\d+)\.json$")


class ClaimError(RuntimeError):
    """Another live run holds the output, or this run lost its claim."""


class CorruptShard(ValueError):
    """A committed shard that is missing or differs from its manifest entry."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def query_hash(query_ids: np.ndarray) -> str:
    """The identity of a unit's queries (their ids in order)."""
    return sha256(np.ascontiguousarray(query_ids, dtype=np.int64).tobytes())[:32]


def read_record(uri: str, what: str = "record") -> dict:
    """A JSON object file, or a ValueError naming the file and what is wrong with it."""
    data = read_bytes(uri)
    if not data.strip():
        raise ValueError(f"{uri}: the {what} is empty (a run was interrupted while writing it?); delete it, or set "
                         "`overwrite: true` to start the output again")
    try:
        record = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{uri}: the {what} is not valid JSON ({err}); delete it, or set `overwrite: true` to "
                         "start the output again") from None
    if not isinstance(record, dict):
        raise ValueError(f"{uri}: the {what} holds a JSON {type(record).__name__}, expected an object; delete it, "
                         "or set `overwrite: true` to start the output again")
    return record


def list_files(root: str, pattern: re.Pattern) -> dict[str, int]:
    """URI -> size of every file under `root` whose path relative to `root` matches `pattern`.

    A recursive listing filtered by a regular expression, never a glob: an output path holding `[`, `*` or `?`
    lists its own files only.
    """
    fs, path = filesystem(root)
    base = path.rstrip("/")
    fs.invalidate_cache()  # other processes (hosts) write here: any cached listing or ETag may be stale
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    files = {}
    for name, info in found.items():
        rel = name[len(base):].lstrip("/") if name.startswith(base) else None
        if rel is not None and pattern.search(rel) and info.get("type", "file") == "file":
            files[join(root, rel)] = int(info.get("size") or 0)
    return dict(sorted(files.items()))


# --- claim -----------------------------------------------------------------------------------------------------

def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (Linux), so a reused pid is not taken for the claim's holder."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict, ttl: float) -> bool:
    """On this host: the holder's process still runs (same pid and start time); elsewhere: a recent heartbeat."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if os.path.isdir("/proc"):
            started = _process_start(pid)
            return started is not None and holder.get("process_start") in (None, started)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        return time.time() - float(holder.get("heartbeat", 0)) < ttl
    except (TypeError, ValueError):
        return False


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Write `uri` only if it does not exist; False if it does."""
    fs, path = filesystem(uri)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    try:
        fs.pipe_file(path, data, mode="create")  # S3: a put with If-None-Match: *
        return True
    except FileExistsError:
        return False
    except TypeError:  # a store without conditional puts: write, then read back who won
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return fs.cat_file(path) == data


class Claim:
    """This run's exclusive claim on an output; refreshed by a heartbeat thread until `release`."""

    def __init__(self, out: str, run_id: str, ttl: float = LOCK_TTL_S) -> None:
        self.out, self.run_id, self.ttl = out, run_id, ttl
        self.uri = join(out, LOCK)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": pid,
                           "process_start": _process_start(pid), "heartbeat": time.time()}).encode()

    def holder(self) -> Optional[dict]:
        """The current claim's record, None when there is none; an unreadable one (a writer cut off mid-write)
        counts as a dead holder."""
        try:
            return read_record(self.uri, "claim")
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def refuse_live(self, holder: Optional[dict]) -> None:
        """Raise ClaimError when `holder` (a claim record) is a run that still lives."""
        if holder and _holder_alive(holder, self.ttl):
            raise ClaimError(
                f"output {self.out!r} is being written by run {holder.get('run_id')} (process "
                f"{holder.get('pid')} on {holder.get('host')}); wait for it to finish, or write elsewhere. If "
                f"that run is gone, its claim expires {self.ttl:.0f} s after its last heartbeat "
                f"(or delete {self.uri})")

    def acquire(self, log: Callable[[str], Any] = lambda *_: None) -> "Claim":
        for _ in range(5):
            if _create_exclusive(self.uri, self._record()):
                break
            holder = self.holder()
            if holder is None:
                continue  # released in between: try again
            self.refuse_live(holder)
            log(f"  output: taking over the claim of run {holder.get('run_id', '?')}, which is no longer running")
            write_bytes_atomic(self.uri, self._record())
            if (self.holder() or {}).get("run_id") == self.run_id:
                break
        else:
            raise ClaimError(f"output {self.out!r}: could not claim it ({self.uri} keeps changing)")
        self._thread = threading.Thread(target=self._beat, name="cfaudit-claim", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if (self.holder() or {}).get("run_id") != self.run_id:
                return  # taken over: the hosts' own checks stop their writes
            write_bytes_atomic(self.uri, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self.holder() or {}).get("run_id") == self.run_id:
            fs, path = filesystem(self.uri)
            fs.rm_file(path)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_unclaimed(out: str) -> None:
    """Raise ClaimError when a live run holds `out` (a preflight: the claim itself is taken later)."""
    claim = Claim(out, "")
    claim.refuse_live(claim.holder())


def check_run(out: str, run_id: str) -> None:
    """Raise ClaimError unless run `run_id` still holds `out` (hosts call it before every write)."""
    uri = join(out, LOCK)
    try:
        holder = read_record(uri, "claim").get("run_id")
    except (FileNotFoundError, ValueError):
        holder = None
    if holder != run_id:
        raise ClaimError(f"run {run_id} no longer holds {out!r} (now: {holder or 'nobody'}); its writes stop here")


def clear_output(out: str, keep: Iterable[str] = (LOCK,)) -> None:
    """Remove everything under `out` but the names in `keep` (the claim of the run that clears it)."""
    fs, path = filesystem(out)
    if not fs.exists(path):
        return
    for child in fs.ls(path, detail=False):
        if os.path.basename(child.rstrip("/")) not in keep:
            fs.rm(child, recursive=True)


def remove_temporaries(out: str) -> int:
    """Delete the `.tmp-*` siblings a killed writer left (only the claim's holder may: none is in flight)."""
    fs, path = filesystem(out)
    if not is_local(fs):
        return 0  # object stores are written in one put: no temporaries
    stale = list_files(out, re.compile(r"(^|/)\.tmp-[^/]*$"))
    for uri in stale:
        os.remove(filesystem(uri)[1])
    return len(stale)


# --- commit and read -------------------------------------------------------------------------------------------

def manifest_uri(out: str, model_id: str, method: str, part: int) -> str:
    return join(out, "manifest", f"model={model_id}", f"method={method}", f"part-{part:05d}.json")


def shard_path(model_id: str, method: str, part: int) -> str:
    """A unit's shard, relative to the output."""
    return f"results/model={model_id}/method={method}/part-{part:05d}.parquet"


def commit_unit(out: str, entry: dict) -> None:
    """Write a unit's manifest entry (after its shard): from now on the unit is done."""
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        raise ValueError(f"manifest entry of {entry.get('unit_id')}: missing {missing}")
    write_bytes_atomic(manifest_uri(out, entry["model_id"], entry["method"], int(entry["part"])),
                       json.dumps(entry, sort_keys=True).encode())


@dataclass(frozen=True)
class Committed:
    uri: str      # the shard
    entry: dict   # its manifest entry


@dataclass
class OutputState:
    """What an output holds: committed shards by (model, method, part), and entries that do not hold up."""

    committed: dict[tuple[str, str, int], Committed]
    problems: dict[tuple[str, str, int], str]


def _entry_problem(entry: Any, key: tuple[str, str, int], spec_hash: str) -> Optional[str]:
    if not isinstance(entry, dict) or any(k not in entry for k in ENTRY_KEYS):
        return "its manifest entry is incomplete"
    if (str(entry["model_id"]), str(entry["method"]), int(entry["part"])) != key:
        return "its manifest entry names another unit"
    if entry["spec_hash"] != spec_hash:
        return f"its manifest entry is of another spec ({entry['spec_hash']})"
    return None


def output_state(out: str, spec_hash: str, verify: bool = False) -> OutputState:
    """Every unit the manifest records, checked against its shard (existence and size; with `verify`, its
    SHA-256 too). Entries of other specs are ignored; a broken entry or shard is a problem, not a unit done."""
    entries = list_files(join(out, "manifest"), _ENTRY_PATH)
    shards = list_files(join(out, "results"), re.compile(r"model=[^/]+/method=[^/]+/part-\d+\.parquet$"))
    state = OutputState({}, {})
    for uri in entries:
        m = _ENTRY_PATH.search(uri)
        key = (m.group(1), m.group(2), int(m.group(3)))
        try:
            entry: Any = json.loads(read_bytes(uri))
        except (ValueError, FileNotFoundError):
            entry = None
        problem = _entry_problem(entry, key, spec_hash)
        if problem and "another spec" in problem:
            continue
        shard = join(out, shard_path(*key))
        if problem is None and shard not in shards:
            problem = "its shard is missing"
        elif problem is None and shards[shard] != int(entry["size"]):
            problem = f"its shard has {shards[shard]} bytes, the manifest says {entry['size']} (truncated?)"
        elif problem is None and verify and sha256(read_bytes(shard)) != entry["sha256"]:
            problem = "its shard's SHA-256 differs from the manifest's (corrupt)"
        if problem:
            state.problems[key] = f"{shard}: {problem}"
        else:
            state.committed[key] = Committed(shard, entry)
    return state


def read_committed(shard: Committed) -> bytes:
    """A committed shard's bytes, after checking them against the entry's size and digest."""
    try:
        data = read_bytes(shard.uri)
    except FileNotFoundError:
        raise CorruptShard(f"{shard.uri}: the shard of committed unit {shard.entry['unit_id']} is missing; re-run "
                           "the audit to write it again") from None
    if len(data) != int(shard.entry["size"]) or sha256(data) != shard.entry["sha256"]:
        raise CorruptShard(f"{shard.uri}: the shard differs from its manifest entry ({len(data)} bytes, expected "
                           f"{shard.entry['size']}; corrupt or truncated); re-run the audit (`cfaudit audit SPEC`) "
                           "to write the unit again")
    return data


def output_spec_hash(out: str, marker: str = "_job.json") -> str:
    """The spec hash an output was claimed for (readers take only that spec's shards)."""
    uri = join(out, marker)
    if not exists(uri):
        raise FileNotFoundError(f"{uri} not found: {out!r} holds no audit (run `cfaudit audit` first)")
    spec_hash = read_record(uri, "job record").get("spec_hash")
    if not isinstance(spec_hash, str):
        raise ValueError(f"{uri}: the job record has no spec_hash; set `overwrite: true` to start the output again")
    return spec_hash

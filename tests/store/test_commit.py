"""The commit protocol (engine/store/commit.py): what a reader takes, what a resume re-runs, who may write.

Each test starts from the state the old code mishandled (issue 22, items 3-6 and 8) and checks the new outcome.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.store.commit import (Claim, ClaimError, CorruptShard, check_run, check_unclaimed, output_state,
                                 read_record, remove_temporaries)
from engine.store.results import finished_units, result_files, shard_uri, write_shard, write_unit
from engine.store.uri import filesystem, read_bytes, write_bytes_atomic
from tests.store.test_results import make_table


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A directory for outputs: local, or a fresh prefix on the local S3 server."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3").url(f"commit-{os.path.basename(str(tmp_path))}")


def _output(out: str, units=((0, "h"),), spec_hash: str = "h") -> str:
    """An output of spec `spec_hash` with one committed unit per (part, unit spec hash)."""
    write_bytes_atomic(f"{out}/_job.json", json.dumps({"spec_hash": spec_hash}).encode())
    with Claim(out, "run-1").acquire() as claim:
        for part, unit_hash in units:
            write_unit(out, make_table()[0], model_id="m", method="wachter", part=part, query_ids=np.arange(3) + part,
                       spec_hash=unit_hash, run_id=claim.run_id)
    return out


def test_glob_characters_in_the_output_path_read_only_that_output(root):
    # Old: result_files('/x/out[1]') globbed and listed /x/out1's shards.
    _output(f"{root}/out1")
    odd = f"{root}/out[1]"
    assert result_files(odd) == [] and finished_units(odd) == set()
    _output(odd, units=((5, "h"),))
    assert [os.path.basename(f) for f in result_files(odd)] == ["part-00005.parquet"]
    assert finished_units(odd) == {("m", "wachter", 5)}


def test_a_truncated_shard_is_named_and_its_unit_runs_again(root):
    # Old: the manifest said done, `cfaudit report` failed with pyarrow's message and no file name.
    out = _output(f"{root}/out", units=((0, "h"), (1, "h")))
    shard = shard_uri(out, "m", "wachter", 1)
    write_bytes_atomic(shard, read_bytes(shard)[:100])
    assert finished_units(out) == {("m", "wachter", 0)}  # unit 1 is no longer done: a resume re-runs it
    with pytest.raises(CorruptShard, match=r"(?s)part-00001\.parquet: its shard has 100 bytes.*re-run the audit"):
        result_files(out)


def test_a_shard_corrupted_in_place_fails_its_digest(root):
    out = _output(f"{root}/out")
    shard = shard_uri(out, "m", "wachter", 0)
    data = bytearray(read_bytes(shard))
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    write_bytes_atomic(shard, bytes(data))
    assert output_state(out, "h").committed  # size alone cannot tell
    state = output_state(out, "h", verify=True)
    assert not state.committed and "SHA-256" in state.problems[("m", "wachter", 0)]
    with pytest.raises(CorruptShard, match="SHA-256"):
        result_files(out)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"rows": 3}'])
def test_a_broken_manifest_entry_is_not_a_finished_unit(root, content):
    # Old: any file under manifest/ counted as done, whatever it held.
    out = _output(f"{root}/out")
    write_bytes_atomic(f"{out}/manifest/model=m/method=wachter/part-00000.json", content)
    assert finished_units(out) == set()
    assert ("m", "wachter", 0) in output_state(out, "h").problems


def test_a_missing_shard_is_reported_not_silently_dropped(root):
    out = _output(f"{root}/out", units=((0, "h"), (1, "h")))
    fs, path = filesystem(shard_uri(out, "m", "wachter", 0))
    fs.rm_file(path)
    assert finished_units(out) == {("m", "wachter", 1)}
    with pytest.raises(CorruptShard, match="part-00000.parquet: its shard is missing"):
        result_files(out)


def test_readers_take_only_committed_shards_of_the_outputs_spec(root):
    # Old: readers read every part-*.parquet, committed or not, whatever its spec_hash.
    out = _output(f"{root}/out", units=((0, "h"), (1, "other-spec")))
    write_shard(shard_uri(out, "m", "wachter", 2), make_table()[0])  # a shard without a commit
    assert [os.path.basename(f) for f in result_files(out)] == ["part-00000.parquet"]
    assert finished_units(out) == {("m", "wachter", 0)}


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"[]", "holds a JSON list"),
                                              (b"{oops", "is not valid JSON")])
def test_a_damaged_job_record_names_its_file(root, content, message):
    # Old: "Expecting value: line 1 column 1" with no file name; `[]` escaped as a traceback.
    write_bytes_atomic(f"{root}/_job.json", content)
    with pytest.raises(ValueError, match=rf"(?s)_job\.json: the job record {message}.*overwrite: true"):
        read_record(f"{root}/_job.json", "job record")


def test_only_one_run_claims_an_output(root):
    # Old: two runs could claim one output (check-then-write).
    out = f"{root}/out"
    first = Claim(out, "run-a").acquire()
    try:
        with pytest.raises(ClaimError, match="being written by run run-a"):
            Claim(out, "run-b").acquire()
        with pytest.raises(ClaimError, match="run-a"):
            check_unclaimed(out)
        check_run(out, "run-a")
        with pytest.raises(ClaimError, match="no longer holds"):
            check_run(out, "run-b")
    finally:
        first.release()
    assert not filesystem(out)[0].exists(filesystem(f"{out}/_lock.json")[1])
    Claim(out, "run-b").acquire().release()


def test_the_claim_of_a_dead_run_is_taken_over_and_its_hosts_stop_writing(tmp_path):
    out = str(tmp_path / "out")
    code = ("import os, sys; from engine.store.commit import Claim; Claim(sys.argv[1], 'dead-run').acquire(); "
            "os._exit(0)")  # exits holding the claim, as a killed driver would
    subprocess.run([sys.executable, "-c", code, out], check=True, cwd=os.getcwd())
    assert read_record(f"{out}/_lock.json")["run_id"] == "dead-run"
    logged = []
    with Claim(out, "new-run").acquire(logged.append):
        assert "taking over the claim of run dead-run" in logged[0]
        with pytest.raises(ClaimError):  # a host of the dead run checks before it writes
            write_unit(out, make_table()[0], model_id="m", method="wachter", part=0, query_ids=np.arange(3),
                       spec_hash="h", run_id="dead-run")
    assert not os.path.exists(shard_uri(out, "m", "wachter", 0))


def test_a_claim_from_another_host_expires_without_heartbeat(tmp_path):
    out = str(tmp_path / "out")
    record = {"run_id": "remote", "host": "elsewhere", "pid": 1, "heartbeat": 0.0}
    write_bytes_atomic(f"{out}/_lock.json", json.dumps(record).encode())
    Claim(out, "mine").acquire().release()  # stale: taken over
    record["heartbeat"] = 1e12  # fresh (far future): live
    write_bytes_atomic(f"{out}/_lock.json", json.dumps(record).encode())
    with pytest.raises(ClaimError, match="remote"):
        Claim(out, "mine").acquire()


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    out = _output(str(tmp_path / "out"))
    stale = tmp_path / "out" / "results" / "model=m" / "method=wachter" / ".tmp-dead-part-00003.parquet"
    stale.write_bytes(b"half a file")
    assert remove_temporaries(out) == 1 and not stale.exists()
    assert finished_units(out) == {("m", "wachter", 0)}

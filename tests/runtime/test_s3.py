"""s3:// outputs through a real S3-compatible server (moto) on 127.0.0.1, and the early storage check.

The same tiny audit written to S3 and to a local directory gives the same rows; a re-run resumes; a missing
bucket, a dead endpoint, denied permission or a read-only directory fail before any model is trained, within
seconds, naming the output and never the credentials. Every connection stays on loopback.
"""
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from engine.spec import AuditSpec, parse_spec
from engine.store.results import result_files
from engine.store.uri import StorageError, check_writable, exists, filesystem, join, read_bytes, write_bytes_atomic
import engine.workflows.audit as audit_module
from engine.workflows.audit import audit
from tests.fixtures.s3 import clear_s3fs_cache, s3_environment, tiny_audit_spec

KEYS = ["model_id", "method", "query_id", "target"]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
SECRETS = [s3_environment("")[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]


def spec_for(output: str) -> AuditSpec:
    return parse_spec(AuditSpec, tiny_audit_spec(output))


def test_uri_functions_on_s3(s3):
    base = s3.url("uri")
    uri = join(base, "a/", "/b.bin")
    assert uri == f"s3://{s3.bucket}/uri/a/b.bin"
    fs, path = filesystem(uri)
    assert "s3" in fs.protocol and path == f"{s3.bucket}/uri/a/b.bin"
    assert not exists(uri)
    write_bytes_atomic(uri, b"first")
    assert exists(uri) and read_bytes(uri) == b"first"
    write_bytes_atomic(uri, b"second")  # replaced whole
    assert read_bytes(uri) == b"second"
    check_writable(base)
    assert [p.rsplit("/", 1)[-1] for p in fs.find(f"{s3.bucket}/uri")] == ["b.bin"]  # the probe is gone


_CONNECTS: list = []  # (host, port) of every socket.connect of this process while a sampler runs
_RECORDING = threading.Event()


def _record_connects(event: str, args: tuple) -> None:
    if event == "socket.connect" and _RECORDING.is_set() and isinstance(args[1], tuple):
        _CONNECTS.append(args[1][:2])


sys.addaudithook(_record_connects)  # hooks cannot be removed: it records only while _RECORDING is set


class ConnectionSampler:
    """The TCP connections of this process and its descendants (Ray's raylet and workers), sampled with
    psutil, plus every connect() of this process (S3 requests are short: one connection each)."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.seen = interval, set()
        self.connects: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                self.seen |= {(c.laddr.ip, c.raddr.ip, c.raddr.port) for c in proc.net_connections(kind="tcp")
                              if c.raddr}
            except psutil.Error:  # a worker that ended meanwhile
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "ConnectionSampler":
        _CONNECTS.clear()
        _RECORDING.set()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _RECORDING.clear()
        self.connects = list(_CONNECTS)
        self._stop.set()
        self._thread.join()
        self.sample()


@pytest.fixture(scope="module")
def s3_ray(s3):
    """A local Ray started after the S3 environment is set, so its workers inherit the endpoint and keys."""
    import ray

    from engine.runtime.cluster import start_ray

    if ray.is_initialized():  # started by an earlier module: its workers lack the S3 environment
        ray.shutdown()
    start_ray(num_cpus=2)
    yield


@pytest.fixture(scope="module")
def audited(s3, s3_ray, tmp_path_factory):
    local = str(tmp_path_factory.mktemp("local-out"))
    remote = s3.url("out")
    local_result = audit(spec_for(local), progress=False)
    with ConnectionSampler() as sampler:
        remote_result = audit(spec_for(remote), log=LOG.append, progress=False)
    return local, remote, local_result, remote_result, sampler


LOG: list[str] = []  # what the S3 audit printed


def read_rows(out: str) -> pa.Table:
    """Every result row under `out`, read through engine.store.uri, sorted, without timing columns."""
    tables = [pq.read_table(io.BytesIO(read_bytes(f))) for f in result_files(out)]
    table = pa.concat_tables(tables).drop_columns(["seconds"])
    return table.take(pc.sort_indices(table, [(k, "ascending") for k in KEYS]))


@pytest.mark.ray
def test_s3_output_gives_the_same_rows_as_local(audited, s3):
    local, remote, local_result, remote_result, _ = audited
    assert local_result.units_failed == [] and remote_result.units_failed == []
    assert remote_result.units_done == remote_result.units_total == 2
    files = result_files(remote)
    assert len(files) == 2 and all(f.startswith(f"s3://{s3.bucket}/out/results/model=cnn/method=wachter/")
                                   for f in files)
    assert exists(join(remote, "_job.json")) and exists(join(remote, "reports", "summary.parquet"))
    local_rows, remote_rows = read_rows(local), read_rows(remote)
    assert remote_rows.num_rows == 20
    assert remote_rows.schema == local_rows.schema
    assert remote_rows.equals(local_rows)


@pytest.mark.ray
def test_s3_rerun_skips_finished_units(audited):
    _, remote, _, _, _ = audited
    again = audit(spec_for(remote), progress=False)
    assert again.units_skipped == again.units_total == 2 and again.units_done == 0


@pytest.mark.ray
def test_s3_resume_with_another_batch_size_is_refused_and_a_corrupt_shard_rewritten(audited):
    # Old: 2 units of 10 re-cut into 3 of 8 re-ran parts and doubled rows; a corrupt shard stayed "done".
    _, remote, _, _, _ = audited
    cut = parse_spec(AuditSpec, {**spec_for(remote).model_dump(mode="json"),
                                 "runtime": {"batch_size": 8, "num_actors": 1}})
    with pytest.raises(ValueError, match=r"runtime\.batch_size 10, this run cuts its units at 8"):
        audit(cut, progress=False)
    shard = result_files(remote)[1]
    before = read_rows(remote)
    write_bytes_atomic(shard, read_bytes(shard)[:-64])  # truncated in place on the object store
    again = audit(spec_for(remote), progress=False)
    assert again.units_done == 1 and again.units_skipped == 1
    assert read_rows(remote).drop_columns(["unit_id"]).equals(before.drop_columns(["unit_id"]))


@pytest.mark.ray
def test_s3_audit_connects_only_to_loopback(audited, s3):
    *_, sampler = audited
    port = int(s3.endpoint.rsplit(":", 1)[1])
    assert ("127.0.0.1", port) in sampler.connects, "expected the driver's S3 requests to reach the server"
    assert [c for c in sampler.connects if c[0] not in LOOPBACK] == []
    assert sampler.seen, "expected Ray's own connections to be visible"
    assert [c for c in sampler.seen if c[0] not in LOOPBACK or c[1] not in LOOPBACK] == []


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if audit() gets as far as loading data or training a model."""
    def reached(*args, **kwargs):
        raise AssertionError("audit() went past the storage check")

    monkeypatch.setattr(audit_module, "open_split", reached)
    monkeypatch.setattr(audit_module, "resolve_classifier", reached)


def assert_clean(message: str) -> None:
    assert not any(secret in message for secret in SECRETS), message


def test_missing_bucket_fails_before_training(s3, no_training, capsys):
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"output 's3://no-such-bucket/out' is not writable: the bucket does "
                                           r"not exist") as err:
        audit(spec_for("s3://no-such-bucket/out"), progress=False)
    assert time.monotonic() - start < 10
    assert_clean(str(err.value) + "".join(capsys.readouterr()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_within_seconds(s3, no_training, monkeypatch, capsys):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    clear_s3fs_cache()
    try:
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"output 's3://{s3.bucket}/out' is not writable: cannot reach "
                                               f"{closed}") as err:
            audit(spec_for(s3.url("out")), progress=False)
        assert time.monotonic() - start < 10
        assert_clean(str(err.value) + "".join(capsys.readouterr()))
    finally:
        monkeypatch.undo()
        clear_s3fs_cache()


def test_denied_permission_is_reported(s3, monkeypatch):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks the (unknown) key
    with pytest.raises(StorageError, match="is not writable: permission denied") as err:
        check_writable(s3.url("out"))
    assert_clean(str(err.value))


def test_cli_reports_a_bad_output_without_a_traceback(s3, no_training, tmp_path, capsys):
    from engine.cli import main

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_audit_spec("s3://no-such-bucket/out")))
    assert main(["audit", str(tmp_path / "tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cfaudit audit: error: output 's3://no-such-bucket/out' is not writable" in err
    assert "Traceback" not in err


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to: mode 0555, and for root (which ignores modes) the immutable flag."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and \
        subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if os.access(path, os.W_OK) and not immutable:
            pytest.skip("cannot make a read-only directory here (root without chattr +i)")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_read_only_directory_fails_before_training(read_only_dir, no_training):
    with pytest.raises(StorageError, match=f"output '{read_only_dir}' is not writable: permission denied"):
        check_writable(str(read_only_dir))
    out = str(read_only_dir / "out")
    with pytest.raises(StorageError, match=f"output '{out}' is not writable: permission denied"):
        audit(spec_for(out), progress=False)
    assert os.listdir(read_only_dir) == []


def test_error_messages_never_carry_credentials(s3):
    from types import SimpleNamespace

    from engine.store.uri import _redact

    fs = SimpleNamespace(storage_options={"key": "AKIDEXAMPLE", "secret": "wJalrEXAMPLEKEY",
                                          "client_kwargs": {"aws_session_token": "SESSIONTOKEN"}})
    text = _redact(f"AKIDEXAMPLE wJalrEXAMPLEKEY SESSIONTOKEN {SECRETS[1]} https://user:pw@host/x", fs)
    assert text == "*** *** *** *** https://***@host/x"


@pytest.mark.ray
def test_credentials_appear_nowhere_the_job_wrote(audited, s3):
    """The keys the S3 audit ran with are in none of its output objects, its log, or its Ray session's logs."""
    import ray

    _, remote, *_ = audited
    fs, root = filesystem(remote)
    objects = [path for path in fs.find(root)]
    assert any(path.endswith(".parquet") for path in objects) and any(path.endswith("_job.json") for path in objects)
    written = {path: fs.cat_file(path) for path in objects}
    session = ray._private.worker._global_node.get_session_dir_path()
    for folder, _, names in os.walk(session):
        for name in names:
            try:
                with open(os.path.join(folder, name), "rb") as fh:
                    written[os.path.join(folder, name)] = fh.read()
            except OSError:  # sockets and files that vanish while the cluster runs
                pass
    written["<log>"] = "\n".join(LOG).encode()
    assert LOG and len(written) > 10
    leaks = [path for path, data in written.items() for secret in SECRETS if secret.encode() in data]
    assert leaks == []

"""fsspec URIs: local paths, s3:// (through s3fs), memory://."""
from __future__ import annotations

import os
import re
import uuid

import fsspec


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for `uri` (a plain path means local)."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """`uri`/part/...; a part may not climb out of `uri` (a `..` segment), so no id or name from a spec or a
    results file can make cfaudit write outside the output root."""
    for part in parts:
        if ".." in str(part).replace("\\", "/").split("/"):
            raise ValueError(f"path component {part!r} under {uri!r} contains '..'; cfaudit writes only inside "
                             "its output root")
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` so readers never see a partial file.

    Locally: a temporary sibling then os.replace. On object stores: a single put, which is atomic
    for readers (the object appears complete or not at all).
    """
    fs, path = filesystem(uri)
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


class StorageError(OSError):
    """An output URI that cannot be written (missing bucket, unreachable endpoint, denied permission)."""


# The probe fails in seconds: botocore's and s3fs's default retries take minutes on a dead endpoint.
_PROBE_CONFIG = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 2, "mode": "standard"}}
_UNREACHABLE = {"ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ClientConnectorError", "TimeoutError", "ConnectionRefusedError", "gaierror"}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def _fast_failing(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """A fresh instance of `fs` with short timeouts and one retry (object stores only)."""
    if "s3" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return fs
    options = dict(fs.storage_options)
    options["config_kwargs"] = {**options.get("config_kwargs", {}), **_PROBE_CONFIG}
    probe_fs = type(fs)(**options, skip_instance_cache=True)
    probe_fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    return probe_fs


def _redact(text: str, fs: fsspec.AbstractFileSystem) -> str:
    """`text` without credentials (storage options or environment) or user info in URLs."""
    options = dict(getattr(fs, "storage_options", {}))
    options.update(options.get("client_kwargs") or {})
    secrets = [v for k, v in options.items()
               if isinstance(v, str) and any(s in k.lower() for s in ("key", "secret", "token", "password"))]
    secrets += [os.environ[k] for k in _SECRET_ENV if os.environ.get(k)]
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return re.sub(r"://[^/@\s]+@", "://***@", text)


def _why(err: BaseException, fs: fsspec.AbstractFileSystem) -> str:
    names = {cls.__name__ for cls in type(err).__mro__}
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "the bucket does not exist" if not is_local(fs) else "a parent directory does not exist"
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        return "part of the path is a file, not a directory"
    if names & _UNREACHABLE:
        client = getattr(fs, "_s3", None)
        endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or "the storage endpoint"
        return f"cannot reach {endpoint}"
    if "NoCredentialsError" in names:
        return "no credentials found (environment, AWS_PROFILE or instance role)"
    return "a probe write failed"


def check_writable(uri: str) -> None:
    """Write and delete a small probe object under `uri`, so a bad output fails before any expensive work.

    Raises StorageError naming `uri` and the cause: a missing bucket or directory, an unreachable
    endpoint (within seconds) or denied permission. Credentials never appear in the message.
    """
    fs, path = filesystem(uri)
    probe_fs = _fast_failing(fs)
    probe = path.rstrip("/") + f"/.cfaudit-probe-{uuid.uuid4().hex}"
    try:
        if is_local(probe_fs):
            os.makedirs(path, exist_ok=True)
            with open(probe, "wb") as fh:
                fh.write(b"probe")
            os.remove(probe)
        else:
            probe_fs.pipe_file(probe, b"probe")
            probe_fs.rm_file(probe)
    except Exception as err:  # every failure becomes one clear message
        detail = _redact(f"{type(err).__name__}: {err}", probe_fs)
        raise StorageError(f"output {_redact(uri, probe_fs)!r} is not writable: {_why(err, probe_fs)} "
                           f"({detail})") from None

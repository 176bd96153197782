"""Object storage for recordings: one small interface, two implementations.

The tmux host uploads finished recordings through it (``tmux_host/recorder.py``); the API function lists and
fetches them. Which store a process gets depends on ``TMUXI_RECORDINGS_URL`` (``Settings.resolved_recordings_url``):
``s3://bucket/prefix`` is S3 (``TMUXI_S3_ENDPOINT_URL`` points it at a moto server in the tests), anything else
is a local directory (default ``<data_dir>/recordings``).

Interface (``Store``)::

    put_file(key, path) -> None          # upload a local file's contents under key (replaces)
    put_bytes(key, data) -> None
    get(key, max_bytes) -> bytes         # NotFound if missing; PayloadTooLarge if larger than max_bytes, decided
                                         # from the object's size before its body is read
    list(prefix) -> list[StoredObject]   # every object whose key starts with prefix, sorted by key

    StoredObject(key, size, modified)    # modified: an aware UTC datetime

Keys are relative, "/"-separated: no leading "/", no empty, "." or ".." segment, no segment named like
LocalStore's temporary files (".<name>.<16 hex digits>.tmp"), no NUL or backslash, at most 1024 bytes (both stores
refuse anything else with ValueError, so code that works against one works against the other). Writes are
whole-object and atomic: a reader sees the old object or the new one, never part of one.

Failures of the store itself -- S3 answering an error, S3 unreachable, the local disk failing -- raise
``DependencyUnavailable``; its message (bucket, key, the error's code) is for the log only (``tmuxi.errors``).

``get_store(settings)`` gives one store per configuration, and the S3 client is made once per process, on first
use (importing this module does not import boto3: the API function's cold start pays for it only when a request
touches recordings).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from tmuxi.errors import DependencyUnavailable, NotFound, PayloadTooLarge

if TYPE_CHECKING:
    from tmuxi.settings import Settings

MAX_KEY_BYTES = 1024
# Recordings (tmux_host/recorder.py writes them, the API lists and serves them): recordings/<session id>/<name>
RECORDINGS_PREFIX = "recordings/"
RECORDING_NAME = re.compile(r"\A[A-Za-z0-9._-]{1,128}\.cast\Z")
# LocalStore writes ".<name>.<16 hex>.tmp" next to the target, then renames it: keys may not look like that.
_TEMP_NAME = re.compile(r"\A\..*\.[0-9a-f]{16}\.tmp\Z", re.DOTALL)
_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    modified: datetime


class Store(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get(self, key: str, max_bytes: int) -> bytes: ...
    def list(self, prefix: str) -> list[StoredObject]: ...


def check_key(key: str) -> str:
    """``key`` if it is a valid object key (module docstring), else ValueError."""
    if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise ValueError("an object key must be 1 to 1024 bytes")
    if "\0" in key or "\\" in key:
        raise ValueError("an object key may not contain NUL or backslash")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segment (or a leading '/')")
        if _TEMP_NAME.match(segment):
            raise ValueError(f"invalid object key {key!r}: a segment named like a temporary file")
    return key


def recording_key(session_id: object, name: str) -> str:
    """The key of a session's recording ``name`` (ValueError for a name that is not one)."""
    if not RECORDING_NAME.match(name):
        raise ValueError(f"{name!r} is not a recording name")
    return check_key(f"{RECORDINGS_PREFIX}{session_id}/{name}")


def _check_prefix(prefix: str) -> str:
    """A list prefix: "" (everything), or a key, or a key followed by "/"."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _too_large(size: int, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the object is {size} bytes, more than the {max_bytes} that can be returned",
                           size=size, max_bytes=max_bytes)


# --- a local directory -----------------------------------------------------------------------------------------
class LocalStore:
    """Objects as files under ``root``: key "a/b/c" is ``root/a/b/c``. Directories are made 0700, files 0600:
    only the service's own user reads recordings. Each write goes to a temporary file in the target's directory,
    is fsynced (the spool copy is deleted once the upload returns), and renamed over the target."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _make_dirs(self, directory: Path) -> None:
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile by another writer
                d.mkdir(mode=0o700)

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        target = self._path(key)
        try:
            self._make_dirs(target.parent)
            tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as out:
                    fill(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise DependencyUnavailable(f"writing {key!r} under {self.root} failed: {exc}") from exc

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:  # a missing source is the caller's error: FileNotFoundError
            self._write(key, lambda out: shutil.copyfileobj(src, out, _READ_CHUNK))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda out: out.write(data))

    def get(self, key: str, max_bytes: int) -> bytes:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"no object {key!r}") from exc
        except OSError as exc:
            raise DependencyUnavailable(f"opening {key!r} under {self.root} failed: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"no object {key!r}")
            if st.st_size > max_bytes:
                raise _too_large(st.st_size, max_bytes)
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)  # it may have grown since fstat: never more than asked for
        except OSError as exc:
            raise DependencyUnavailable(f"reading {key!r} under {self.root} failed: {exc}") from exc
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise _too_large(len(data), max_bytes)
        return data

    def list(self, prefix: str) -> list[StoredObject]:
        _check_prefix(prefix)
        # walk only the deepest directory the prefix names in full ("recordings/abc/x" -> recordings/abc)
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*head.split("/")) if head else self.root
        found: list[StoredObject] = []
        try:
            _walk(start, head + "/" if head else "", prefix, found)
        except OSError as exc:
            raise DependencyUnavailable(f"listing {prefix!r} under {self.root} failed: {exc}") from exc
        found.sort(key=lambda o: o.key)
        return found


def _walk(directory: Path, rel: str, prefix: str, found: list[StoredObject]) -> None:
    """Adds the files below ``directory`` (whose key is ``rel``) that start with ``prefix``; never follows a
    symlink, skips writes in progress."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        key = rel + entry.name
        if _TEMP_NAME.match(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            if key.startswith(prefix) or prefix.startswith(key + "/"):
                _walk(Path(entry.path), key + "/", prefix, found)
        elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
            st = entry.stat(follow_symlinks=False)
            found.append(StoredObject(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))


# --- S3 --------------------------------------------------------------------------------------------------------
_clients: dict[tuple[str | None, str], Any] = {}
_clients_lock = threading.Lock()


def _s3_client(endpoint_url: str | None, region: str) -> Any:
    """One client per process and endpoint, made on first use (the host's upload threads and the local gateway's
    request threads share it: boto3 clients are thread-safe once made, sessions are not)."""
    key = (endpoint_url, region)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    region_name=region,
                    # a host retries failed uploads every heartbeat and the API answers within API Gateway's 29 s:
                    # fail fast rather than wait out botocore's 60 s defaults
                    connect_timeout=2, read_timeout=10,
                    retries={"max_attempts": 3, "mode": "standard"},
                    # an explicit endpoint (moto, a local emulator) is an address, not a DNS zone for buckets
                    s3={"addressing_style": "path"} if endpoint_url else None,
                )
                client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
                _clients[key] = client
    return client


class S3Store:
    """Objects in ``bucket`` under ``prefix`` (key "a/b" is object "<prefix>a/b"). Every put asks for
    server-side encryption (SSE-S3); a bucket whose default is SSE-KMS keeps its default for objects written
    without a header, and accepts this one."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str = "us-east-1", *, page_size: int = 1000) -> None:
        if not bucket:
            raise ValueError("an S3 store needs a bucket")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.page_size = page_size  # objects per ListObjectsV2 request (S3's maximum: 1000)

    @property
    def _client(self) -> Any:
        return _s3_client(self.endpoint_url, self.region)

    def _fail(self, op: str, key: str, exc: Exception) -> DependencyUnavailable:
        code = _error_code(exc)
        detail = f"{code}: {_error_message(exc)}" if code else f"{type(exc).__name__}: {exc}"
        return DependencyUnavailable(f"S3 {op} of s3://{self.bucket}/{self.prefix}{key} failed ({detail})")

    def put_file(self, key: str, path: Path) -> None:
        check_key(key)
        with open(path, "rb") as body:  # a missing source is the caller's error: FileNotFoundError
            self._put(key, body)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(check_key(key), data)

    def _put(self, key: str, body: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body,
                                    ServerSideEncryption="AES256")
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("put", key, exc) from exc

    def get(self, key: str, max_bytes: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        check_key(key)
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no object {key!r}") from exc
            raise self._fail("get", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("get", key, exc) from exc
        body = resp["Body"]
        try:
            size = int(resp.get("ContentLength", 0))
            if size > max_bytes:
                raise _too_large(size, max_bytes)  # the body is closed unread below
            data: bytes = body.read(max_bytes + 1)
        except BotoCoreError as exc:
            raise self._fail("get", key, exc) from exc
        finally:
            body.close()
        if len(data) > max_bytes:
            raise _too_large(len(data), max_bytes)
        return data

    def list(self, prefix: str) -> list[StoredObject]:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_prefix(prefix)
        found: list[StoredObject] = []
        cut = len(self.prefix)
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix, PaginationConfig={"PageSize": self.page_size})
            for page in pages:
                for obj in page.get("Contents", ()):
                    found.append(StoredObject(obj["Key"][cut:], int(obj["Size"]),
                                              obj["LastModified"].astimezone(UTC)))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("list", prefix, exc) from exc
        found.sort(key=lambda o: o.key)
        return found


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _error_message(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Message", "")) if isinstance(response, dict) else ""


# --- from settings ---------------------------------------------------------------------------------------------
def parse_s3_url(url: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix" -> ("bucket", "some/prefix")."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: an S3 recordings URL is s3://bucket[/prefix]")
    return bucket, prefix.strip("/")


_stores: dict[tuple[str, str | None, str], Store] = {}
_stores_lock = threading.Lock()


def get_store(settings: Settings | None = None) -> Store:
    """The store that ``settings`` (default: this process's) configure, one per configuration."""
    if settings is None:
        from tmuxi.settings import get_settings

        settings = get_settings()
    url = settings.resolved_recordings_url
    cache_key = (url, settings.s3_endpoint_url, settings.aws_region)
    with _stores_lock:
        store = _stores.get(cache_key)
        if store is None:
            if url.startswith("s3://"):
                bucket, prefix = parse_s3_url(url)
                store = S3Store(bucket, prefix, settings.s3_endpoint_url, settings.aws_region)
            else:
                store = LocalStore(url)
            _stores[cache_key] = store
    return store

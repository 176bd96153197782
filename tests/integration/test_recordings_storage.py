"""Recordings in S3: tmuxi.storage.S3Store against a real moto server (one per test, on 127.0.0.1, reached
through boto3), and the recorder's uploads through it -- including an upload that fails while the server is
down and is retried once it is back. The directory store and the recording format: tests/unit/test_recorder.py."""
from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.hosting import isolated_aws_env
from tests.unit.test_recorder import CHUNKS, Clock, asciinema_cat, events
from tmux_host.recorder import Recorder
from tmuxi.errors import DependencyUnavailable, NotFound, PayloadTooLarge
from tmuxi.settings import Settings
from tmuxi.storage import LocalStore, S3Store, get_store

BUCKET = "tmuxi-recordings"


class Moto:
    """A moto S3 server in this process that can be stopped and started again on the same port (its objects
    stay: moto keeps them in the process)."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()
        # ThreadedMotoServer.stop() ends serving but leaves the socket listening: connections would then hang
        # instead of being refused as they are when a server is down
        if self.server._server is not None:
            self.server._server.server_close()

    def restart(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Moto]:
    isolated_aws_env(monkeypatch, tmp_path)
    server = Moto()
    boto3.session.Session().client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(
        Bucket=BUCKET)
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()


def raw_client(moto: Moto):  # type: ignore[no-untyped-def]
    return boto3.session.Session().client("s3", endpoint_url=moto.url, region_name="us-east-1")


def test_s3_store_round_trip_encrypted_and_listed_across_pages(moto: Moto, tmp_path: Path) -> None:
    store = S3Store(BUCKET, "env/rec", moto.url, "us-east-1", page_size=2)
    src = tmp_path / "one.cast"
    src.write_bytes(b"from a file\n")
    store.put_file("recordings/s1/b.cast", src)
    for key in ("recordings/s1/a.cast", "recordings/s1/c.cast", "recordings/s10/x.cast", "recordings/s2/d.cast"):
        store.put_bytes(key, key.encode())

    assert store.get("recordings/s1/b.cast", 100) == b"from a file\n"
    listed = store.list("recordings/s1/")  # three pages of two
    assert [(o.key, o.size) for o in listed] == [("recordings/s1/a.cast", 20), ("recordings/s1/b.cast", 12),
                                                 ("recordings/s1/c.cast", 20)]
    assert all(o.modified.utcoffset() == timedelta(0) for o in listed)
    assert [o.key for o in store.list("")] == ["recordings/s1/a.cast", "recordings/s1/b.cast",
                                               "recordings/s1/c.cast", "recordings/s10/x.cast",
                                               "recordings/s2/d.cast"]

    raw = raw_client(moto)
    head = raw.head_object(Bucket=BUCKET, Key="env/rec/recordings/s1/b.cast")  # under the store's prefix
    assert head["ServerSideEncryption"] == "AES256"

    with pytest.raises(NotFound):
        store.get("recordings/s1/missing.cast", 100)
    with pytest.raises(PayloadTooLarge):
        store.get("recordings/s1/b.cast", 11)
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"")


def test_s3_failures_become_dependency_unavailable(moto: Moto) -> None:
    with pytest.raises(DependencyUnavailable) as raised:
        S3Store("no-such-bucket", "", moto.url).put_bytes("k", b"v")
    assert "NoSuchBucket" in raised.value.message and raised.value.status == 503

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = S3Store(BUCKET, "", dead)
    calls: list[Callable[[], object]] = [lambda: down.get("k", 10), lambda: down.list(""),
                                         lambda: down.put_bytes("k", b"v")]
    for call in calls:
        with pytest.raises(DependencyUnavailable) as raised:
            call()
        assert "EndpointConnectionError" in raised.value.message
        assert "testing" not in raised.value.message  # no credential in what is logged


class CountingRelay:
    """A TCP relay to the moto server that counts the bytes it passes on to the client."""

    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.to_client = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if count:
                    self.to_client += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_s3_get_refuses_a_too_large_object_without_reading_it(moto: Moto) -> None:
    size = 64 << 20
    S3Store(BUCKET, "", moto.url).put_bytes("recordings/s/big.cast", b"x" * size)
    relay = CountingRelay(moto.port)
    try:
        with pytest.raises(PayloadTooLarge) as raised:
            S3Store(BUCKET, "", relay.url).get("recordings/s/big.cast", 1 << 20)
        assert raised.value.details == {"size": size, "max_bytes": 1 << 20}
        # what reached the client is what the sockets' buffers took before it hung up, not the object
        assert relay.to_client < size // 4
    finally:
        relay.close()


def test_recordings_upload_to_s3_and_a_failed_upload_is_retried(moto: Moto, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    store = S3Store(BUCKET, "rec", moto.url, "us-east-1")
    spool = tmp_path / "spool"
    rec = Recorder(spool, store, "host-7", 1 << 20, clock=Clock())

    rec.start("sess-a", 80, 24)
    for i, chunk in enumerate(CHUNKS):
        rec.output("sess-a", chunk)
        if i == 4:
            rec.resize("sess-a", 120, 40)
    key = rec.finish("sess-a")
    assert key == "recordings/sess-a/host-7-20231114T221320124456Z.cast"
    fetched = tmp_path / "a.cast"
    fetched.write_bytes(store.get(key, 1 << 20))
    assert asciinema_cat(fetched) == b"".join(CHUNKS)
    assert [e[1:] for e in events(fetched.read_bytes())[1] if e[1] == "r"] == [["r", "120x40"]]

    # S3 goes away: the finished recording stays in the spool, and every heartbeat's retry fails (logged once)
    rec.start("sess-b", 80, 24)
    rec.output("sess-b", b"recorded while S3 was down\r\n")
    moto.stop()
    caplog.clear()
    assert rec.finish("sess-b") is None
    assert rec.retry_uploads() == 0
    assert rec.retry_uploads() == 0
    [pending] = list((spool / "done").iterdir())
    warnings = [r for r in caplog.records if "upload failed" in r.getMessage()]
    assert len(warnings) == 1 and "EndpointConnectionError" in getattr(warnings[0], "error", "")

    moto.restart()
    assert rec.retry_uploads() == 1
    assert not pending.exists()
    assert "recording uploads work again" in caplog.messages
    [obj] = store.list("recordings/sess-b/")
    assert obj.key == "recordings/sess-b/" + pending.name.split("@", 1)[1]
    fetched.write_bytes(store.get(obj.key, 1 << 20))
    assert asciinema_cat(fetched) == b"recorded while S3 was down\r\n"
    assert [o.key.split("/")[1] for o in store.list("recordings/")] == ["sess-a", "sess-b"]


def test_get_store_follows_the_settings(moto: Moto, tmp_path: Path) -> None:
    s3 = Settings(recordings_url=f"s3://{BUCKET}/some/prefix/", s3_endpoint_url=moto.url, aws_region="eu-west-1")
    store = get_store(s3)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == (BUCKET, "some/prefix/", moto.url,
                                                                              "eu-west-1")
    assert get_store(s3) is store  # one per configuration
    store.put_bytes("k", b"v")
    assert raw_client(moto).get_object(Bucket=BUCKET, Key="some/prefix/k")["Body"].read() == b"v"

    local = get_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStore) and local.root == tmp_path.absolute() / "recordings"
    explicit = get_store(Settings(recordings_url=str(tmp_path / "elsewhere")))
    assert isinstance(explicit, LocalStore) and explicit.root == tmp_path / "elsewhere"

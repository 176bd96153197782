"""Live output: each session's output as one byte stream, its viewers (WebSocket connections) and their senders.

The path (docs/websocket.md): the user's tmux server -> its output client (``%output``, control.py) ->
``Live.output`` -> the session's :class:`OutputBuffer` (the last ``stream_buffer_bytes``, numbered by byte) and
its recording -> one :class:`Viewer` per connection, each with its own position and its own sender task ->
``gateway_client.post`` (the API Gateway Management API, boto3, in a small thread pool) -> the client.

Flow control: the buffer is the only place output is held, and it is bounded; a viewer is a position in it. A
viewer that is slow, stalled or throttled (429) only falls behind; once its position is older than the buffer
it gets a fresh screen (``snapshot``, ``gap: true``) and goes on from there. So no viewer can grow the host's
memory or slow another viewer or session. Batching: a sender sends whatever accumulated while its previous
frame was in flight, cut at ``ws_frame_data_bytes``: a keystroke's echo on an idle session goes at once, a flood
goes in full frames.

Messages from clients that API Gateway routes to a host (``$default``: input, resize, ping, anything else) come
in through ``Live.message``; one for a connection attached on another host is forwarded there (host addresses
come from the system of record, never from the message).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

import aiohttp  # at start: importing it takes ~1 s, which the first forwarded keystroke would otherwise wait
import orjson

from tmuxi import errors, gateway_client
from tmuxi.gateway_client import ConnectionGone, DeliveryFailed, Throttled
from tmuxi.host_client import SECRET_HEADER
from tmuxi.observability import WS_BYTES, WS_CONNECTIONS, WS_ERRORS, WS_LATENCY, WS_RECEIVED, WS_SENT, logger
from tmuxi.routes import WS_CONNECTION_HEADER, WS_HOST_MESSAGE_PATH
from tmuxi.settings import Settings

if TYPE_CHECKING:
    from tmux_host.engine import Engine

# metric children, looked up once (labels() costs more than the rest of a frame's bookkeeping)
_BYTES = WS_BYTES.labels(component="host")
_SENT = WS_SENT.labels(component="host")
_RECEIVED = WS_RECEIVED.labels(component="host")
_POST_LATENCY = WS_LATENCY.labels(component="host", operation="post")
_MESSAGE_LATENCY = WS_LATENCY.labels(component="host", operation="message")

# Replies (pong, errors) waiting for a viewer's delivery; more are dropped (a stalled client could ping forever).
MAX_CONTROL_QUEUED = 64
# A delivery failing for this long (endpoint down) drops the viewer; its client reconnects and resumes.
DELIVERY_GIVE_UP_S = 60.0
RETRY_MIN_S, RETRY_MAX_S = 0.05, 1.0


def _msg(**fields: Any) -> bytes:
    return orjson.dumps(fields)


class OutputBuffer:
    """Bytes ``[start, end)`` of one stream: at least the last ``limit`` bytes, at most 1.5 times that (trimmed in
    one move when it reaches it, so appending stays O(1) amortised)."""

    __slots__ = ("limit", "_buf", "start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + len(self._buf)

    def append(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if len(buf) > self.limit + (self.limit >> 1):
            cut = len(buf) - self.limit
            del buf[:cut]
            self.start += cut

    def read(self, seq: int, max_bytes: int) -> bytes | None:
        """Up to ``max_bytes`` from ``seq``; None when ``seq`` is no longer (or not) held."""
        if seq < self.start or seq > self.end:
            return None
        off = seq - self.start
        return bytes(self._buf[off:off + max_bytes])


class SessionStream:
    __slots__ = ("session_id", "account", "stream_id", "buffer", "viewers")

    def __init__(self, session_id: UUID, account: int, buffer_bytes: int) -> None:
        self.session_id = session_id
        self.account = account
        self.stream_id = os.urandom(8).hex()  # a new stream per host run: positions of another mean nothing here
        self.buffer = OutputBuffer(buffer_bytes)
        self.viewers: set[Viewer] = set()

    def feed(self, data: bytes) -> None:
        self.buffer.append(data)
        for v in self.viewers:
            v.wake.set()


class Viewer:
    """One connection attached to one session: a position in its stream and a task that sends from there."""

    def __init__(self, live: Live, stream: SessionStream, connection_id: str, *, read_only: bool,
                 share_id: UUID | None, expires_at: float | None) -> None:
        self.live = live
        self.stream = stream
        self.connection_id = connection_id
        self.read_only = read_only
        self.share_id = share_id
        self.expires_at = expires_at
        self.pos = stream.buffer.end
        self.need_snapshot = False
        self.gap = False
        self._snapshot_failures = 0
        self.control: deque[bytes] = deque()  # messages that go before any more output (attached, pong, errors)
        self.wake = asyncio.Event()
        self.closing: bytes | None = None  # the last message (detached); sent, then the viewer ends
        self.task: asyncio.Task[None] | None = None

    def send(self, message: bytes) -> None:
        if len(self.control) >= MAX_CONTROL_QUEUED:  # a client pinging a viewer that cannot deliver: drop, not grow
            WS_ERRORS.labels(component="host", kind="control_dropped").inc()
            return
        self.control.append(message)
        self.wake.set()

    def close(self, message: bytes | None) -> None:
        """End after sending ``message`` (None: at once, without a word)."""
        if message is None:
            if self.task is not None:
                self.task.cancel()
            self.live._forget(self)
            return
        self.closing = message
        self.wake.set()

    async def run(self) -> None:
        try:
            while True:
                if self.control:
                    await self._deliver(self.control.popleft())
                    continue
                if self.closing is not None:
                    with contextlib.suppress(DeliveryFailed):
                        await self._deliver(self.closing, patient=False)
                    return
                if self.expires_at is not None and time.time() >= self.expires_at:
                    self.closing = _msg(type="detached", session_id=str(self.stream.session_id),
                                        reason="the share expired")
                    continue
                if self.need_snapshot:
                    await self._snapshot()
                    continue
                data = self.stream.buffer.read(self.pos, self.live.frame_bytes)
                if data is None:  # fell behind the buffer: a fresh screen instead of what was lost
                    self.need_snapshot, self.gap = True, True
                    continue
                if data:
                    frame = _msg(type="output", seq=self.pos, data=base64.b64encode(data).decode("ascii"))
                    await self._deliver(frame)
                    self.pos += len(data)
                    _BYTES.inc(len(data))
                    continue
                self.wake.clear()
                if self.control or self.closing is not None or self.stream.buffer.end > self.pos:
                    continue
                timeout = None if self.expires_at is None else max(0.0, self.expires_at - time.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)
        except ConnectionGone:
            logger.info("viewer's connection is gone", extra={"session_id": str(self.stream.session_id)})
        except asyncio.CancelledError:
            raise
        except Exception:
            WS_ERRORS.labels(component="host", kind="sender").inc()
            logger.exception("viewer sender failed", extra={"session_id": str(self.stream.session_id)})
        finally:
            self.live._forget(self)

    async def _snapshot(self) -> None:
        self.need_snapshot = False
        at: list[int] = []
        try:
            screen = await self.live.engine.screen(self.stream.session_id, escapes=True,
                                                   at_capture=lambda: at.append(self.stream.buffer.end))
        except errors.AppError as exc:
            sid = self.stream.session_id
            gone = self.live.engine.ended_how(sid)
            if gone is not None:  # it ended meanwhile (and its server with it, maybe)
                self.closing = _msg(type="detached", session_id=str(sid), state=gone[0], reason=gone[1])
            elif self._snapshot_failures < 3:  # ending right now (the host will know in a moment), or a hiccup
                self._snapshot_failures += 1
                self.need_snapshot = True
                await asyncio.sleep(0.2)
            else:
                self.closing = _msg(type="detached", session_id=str(sid), reason=exc.message)
            return
        self._snapshot_failures = 0
        self.pos = at[0] if at else self.stream.buffer.end  # where the screen as captured leaves off
        data = snapshot_bytes(screen.text, screen.cursor_x, screen.cursor_y)
        gap, self.gap = self.gap, False
        for off in range(0, max(1, len(data)), self.live.frame_bytes):  # a big screen: several frames, in order
            part = data[off:off + self.live.frame_bytes]
            await self._deliver(_msg(type="snapshot", seq=self.pos, cols=screen.cols, rows=screen.rows, gap=gap,
                                     data=base64.b64encode(part).decode("ascii")))

    async def _deliver(self, message: bytes, *, patient: bool = True) -> None:
        """Post one message; on 429 or a failing endpoint wait and try again (the position stays; output goes on
        into the buffer), up to DELIVERY_GIVE_UP_S. Raises ConnectionGone."""
        delay = RETRY_MIN_S
        first_failure: float | None = None
        while True:
            started = time.perf_counter()
            try:
                await self.live.post(self.connection_id, message)
                _POST_LATENCY.observe(time.perf_counter() - started)
                _SENT.inc()
                return
            except ConnectionGone:
                raise
            except DeliveryFailed as exc:
                kind = "throttled" if isinstance(exc, Throttled) else "delivery"
                WS_ERRORS.labels(component="host", kind=kind).inc()
                now = time.monotonic()
                first_failure = first_failure or now
                if not patient or now - first_failure > DELIVERY_GIVE_UP_S:
                    logger.warning("giving up on a viewer's connection", extra={"error": str(exc)[:200]})
                    raise ConnectionGone(str(exc)) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)


def snapshot_bytes(text: str, cursor_x: int, cursor_y: int) -> bytes:
    """A screen as the bytes that draw it on a cleared terminal: reset, home, clear, its lines (with their
    attributes, from ``capture-pane -e``), the cursor where it was."""
    body = text.replace("\n", "\r\n")
    return f"\x1b[0m\x1b[H\x1b[2J{body}\x1b[0m\x1b[{cursor_y + 1};{cursor_x + 1}H".encode("utf-8", "replace")


class Live:
    """Every session's stream and every viewer on this host."""

    def __init__(self, engine: Engine, settings: Settings,
                 find_connection: Callable[[str], tuple[str, str] | None] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.frame_bytes = settings.ws_frame_data_bytes
        self.streams: dict[UUID, SessionStream] = {}
        self.viewers: dict[str, Viewer] = {}
        self.find_connection = find_connection  # registry.connection_target: (host id, url) of a connection
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.ws_post_threads, thread_name_prefix="ws-post")
        self._targets: dict[str, tuple[float, tuple[str, str] | None]] = {}
        self._forwarder: Any = None
        self._gauge = WS_CONNECTIONS.labels(component="host")
        self._draining_until: float | None = None  # monotonic: when a draining host ends the sessions left

    async def post(self, connection_id: str, message: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, gateway_client.post, connection_id, message,
                                                         self.settings)

    def _post_soon(self, connection_id: str, message: bytes) -> None:
        """A one-off message to a connection with no viewer here (an error, a pong): best effort."""
        async def send() -> None:
            with contextlib.suppress(DeliveryFailed):
                await self.post(connection_id, message)
        self.engine._spawn(send(), "ws-reply")

    # --- streams (the engine calls these) ----------------------------------------------------------------
    def started(self, session_id: UUID, account: int) -> SessionStream:
        stream = self.streams.get(session_id)
        if stream is None:
            stream = self.streams[session_id] = SessionStream(session_id, account, self.settings.stream_buffer_bytes)
        return stream

    def output(self, session_id: UUID, data: bytes) -> None:
        stream = self.streams.get(session_id)
        if stream is not None:
            stream.feed(data)

    def resync(self, session_ids: list[UUID]) -> None:
        """Output of these sessions may have been lost (tmux paused a pane, the output client was restarted):
        every viewer gets a fresh screen."""
        for sid in session_ids:
            stream = self.streams.get(sid)
            if stream is None:
                continue
            for v in stream.viewers:
                v.need_snapshot, v.gap = True, True
                v.wake.set()

    def draining(self, deadline_s: float) -> None:
        """The host is going (drain.py): every viewer is told now, and every viewer that attaches from now on."""
        self._draining_until = time.monotonic() + deadline_s
        for v in list(self.viewers.values()):
            v.send(self._draining_frame(v.stream.session_id))

    def _draining_frame(self, session_id: UUID) -> bytes:
        left = max(0, round((self._draining_until or 0) - time.monotonic()))
        return _msg(type="host_draining", session_id=str(session_id), deadline_s=left)

    async def flushed(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until every viewer has ended: their last messages delivered."""
        deadline = time.monotonic() + timeout_s
        while self.viewers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.viewers

    def ended(self, session_id: UUID, state: str, reason: str) -> None:
        stream = self.streams.pop(session_id, None)
        if stream is None:
            return
        for v in list(stream.viewers):
            v.close(_msg(type="detached", session_id=str(session_id), state=state, reason=reason))

    # --- viewers (the API calls these) -------------------------------------------------------------------
    async def attach(self, session_id: UUID, connection_id: str, *, read_only: bool, stream_id: str | None,
                     last_seq: int | None, share_id: UUID | None, expires_at: float | None) -> dict[str, Any]:
        rec = self.engine._get(session_id)
        stream = self.streams.get(session_id) or self.started(session_id, rec.account)
        cols, rows = await self.engine.pane_size(session_id)
        old = self.viewers.get(connection_id)
        if old is not None:
            old.close(None)
        v = Viewer(self, stream, connection_id, read_only=read_only, share_id=share_id, expires_at=expires_at)
        resume = stream_id == stream.stream_id and last_seq is not None and \
            stream.buffer.read(last_seq, 0) is not None
        if resume:
            assert last_seq is not None
            v.pos = last_seq
        else:
            v.need_snapshot, v.gap = True, last_seq is not None
        v.send(_msg(type="attached", session_id=str(session_id), stream=stream.stream_id, seq=v.pos,
                    read_only=read_only, cols=cols, rows=rows))
        if self._draining_until is not None:
            v.send(self._draining_frame(session_id))
        self.viewers[connection_id] = v
        stream.viewers.add(v)
        v.task = self.engine._spawn(v.run(), "ws-viewer")
        self._gauge.set(len(self.viewers))
        return {"stream": stream.stream_id, "seq": v.pos, "resumed": resume}

    def detach(self, connection_id: str, reason: str, *, notify: bool) -> bool:
        v = self.viewers.get(connection_id)
        if v is None:
            return False
        v.close(_msg(type="detached", session_id=str(v.stream.session_id), reason=reason) if notify else None)
        return True

    def _forget(self, v: Viewer) -> None:
        if self.viewers.get(v.connection_id) is v:
            del self.viewers[v.connection_id]
        v.stream.viewers.discard(v)
        self._gauge.set(len(self.viewers))

    async def close(self) -> None:
        for v in list(self.viewers.values()):
            v.close(None)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._forwarder is not None:
            await self._forwarder.close()

    # --- messages from clients ($default) -----------------------------------------------------------------
    async def message(self, connection_id: str, body: bytes, *, forwarded: bool = False) -> bool:
        """Serve one message. False: it was forwarded here, but its connection has no viewer here (any more)."""
        _RECEIVED.inc()
        started = time.perf_counter()
        v = self.viewers.get(connection_id)
        if v is None:
            if forwarded:
                return False  # the forwarding host looks again
            if await self._forward(connection_id, body):
                return True
            # validate before saying "not attached": a bad frame is a bad frame wherever it lands
            try:
                msg = parse_message(body)
                if msg["action"] == "ping":  # a connection may ping before it attaches (keep-alive)
                    self._post_soon(connection_id, _msg(type="pong", id=msg.get("id")))
                else:
                    self._post_soon(connection_id, _error("not_attached", "attach to a session first"))
            except MessageError as exc:
                self._post_soon(connection_id, _error(exc.code, exc.message))
            return True
        try:
            msg = parse_message(body)
            action = msg["action"]
            if action == "ping":
                v.send(_msg(type="pong", id=msg.get("id")))
            elif v.read_only:
                raise MessageError("read_only", f"this attach is read-only: {action} is not allowed")
            elif action == "input":
                await self.engine.send_input(v.stream.session_id, data=msg["data"])
            elif action == "resize":
                await self.engine.resize(v.stream.session_id, msg["cols"], msg["rows"])
        except MessageError as exc:
            v.send(_error(exc.code, exc.message))
        except errors.AppError as exc:
            v.send(_error("unavailable" if exc.status >= 500 else "invalid", exc.message))
        _MESSAGE_LATENCY.observe(time.perf_counter() - started)
        return True

    async def _forward(self, connection_id: str, body: bytes) -> bool:
        """Send a message for a connection attached on another host to that host. False: it is attached nowhere
        (or here: a stale record). Where a connection is attached is cached for TARGET_TTL_S; a host that no
        longer holds it answers 409 and the record is read again."""
        for fresh in (False, True):
            target = await self._target(connection_id, fresh=fresh)
            if target is None or target[0] == self.settings.host_id:
                return False
            status = await self._forward_to(target, connection_id, body)
            if status != 409:
                return True
        return False

    async def _forward_to(self, target: tuple[str, str], connection_id: str, body: bytes) -> int:
        if self._forwarder is None:  # aiohttp: ~0.3 ms a hop here, httpx ~0.6 ms (a forwarded keystroke pays it)
            self._forwarder = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.host_timeout_s))
        try:
            async with self._forwarder.post(
                    target[1].rstrip("/") + WS_HOST_MESSAGE_PATH, data=body,
                    headers={SECRET_HEADER: self.settings.require_host_secret(), WS_CONNECTION_HEADER: connection_id,
                             FORWARDED_HEADER: "1"}) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._targets.pop(connection_id, None)
            logger.warning("could not forward a WebSocket message", extra={"host_id": target[0], "error": str(exc)})
            self._post_soon(connection_id, _error("unavailable", "the session's host is not reachable; retry"))
            return 503
        if status >= 400:
            self._targets.pop(connection_id, None)
        return int(status)

    async def _target(self, connection_id: str, *, fresh: bool = False) -> tuple[str, str] | None:
        cached = self._targets.get(connection_id)
        now = time.monotonic()
        if cached is not None and cached[0] > now and not fresh:
            return cached[1]
        if self.find_connection is None:
            return None
        try:
            target = await asyncio.to_thread(self.find_connection, connection_id)
        except Exception as exc:
            logger.warning("connection lookup failed", extra={"error": str(exc)[:200]})
            return None
        if target is None:  # not attached (yet): not cached, an attach may come any moment
            self._targets.pop(connection_id, None)
            return None
        if len(self._targets) > 10_000:
            self._targets.clear()
        self._targets[connection_id] = (now + TARGET_TTL_S, target)
        return target


FORWARDED_HEADER = "X-Tmuxi-Forwarded"
TARGET_TTL_S = 5.0
MAX_INPUT_CHARS = 32 * 1024


class MessageError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _error(code: str, message: str) -> bytes:
    return _msg(type="error", code=code, message=message)


def parse_message(body: bytes) -> dict[str, Any]:
    """A `$default` message, validated: {"action": "input", "data": bytes} | {"action": "resize", "cols", "rows"}
    | {"action": "ping", "id"}. Raises MessageError with the code and message the client gets."""
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MessageError("bad_frame", "a message must be a JSON object with an \"action\"") from None
    if not isinstance(msg, dict):
        raise MessageError("bad_frame", "a message must be a JSON object with an \"action\"")
    action = msg.get("action")
    if action == "input":
        if isinstance(msg.get("data"), str):
            text = msg["data"]
            if len(text) > MAX_INPUT_CHARS:
                raise MessageError("invalid", f"input.data is over {MAX_INPUT_CHARS} characters")
            data = text.encode("utf-8", "surrogatepass")
        elif isinstance(msg.get("data_b64"), str):
            try:
                data = base64.b64decode(msg["data_b64"], validate=True)
            except (binascii.Error, ValueError):
                raise MessageError("invalid", "input.data_b64 is not valid base64") from None
        else:
            raise MessageError("invalid", "input needs \"data\" (a string) or \"data_b64\"")
        return {"action": "input", "data": data}
    if action == "resize":
        cols, rows = msg.get("cols"), msg.get("rows")
        if not (isinstance(cols, int) and not isinstance(cols, bool) and 10 <= cols <= 1000):
            raise MessageError("invalid", "resize.cols must be an integer from 10 to 1000")
        if not (isinstance(rows, int) and not isinstance(rows, bool) and 5 <= rows <= 500):
            raise MessageError("invalid", "resize.rows must be an integer from 5 to 500")
        return {"action": "resize", "cols": cols, "rows": rows}
    if action == "ping":
        ident = msg.get("id")
        return {"action": "ping", "id": ident if isinstance(ident, str | int) and len(str(ident)) <= 64 else None}
    if not isinstance(action, str):
        raise MessageError("bad_frame", "a message must be a JSON object with an \"action\"")
    raise MessageError("unknown_action", f"unknown action {action[:32]!r}: use attach, input, resize, detach "
                                         "or ping")

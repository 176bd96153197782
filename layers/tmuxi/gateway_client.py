"""The API Gateway Management API: how a tmux host sends a WebSocket client its messages.

boto3's ``apigatewaymanagementapi`` client against ``settings.ws_management_endpoint`` (in AWS
``https://{api-id}.execute-api.{region}.amazonaws.com/{stage}``; locally the local gateway's WebSocket side,
which serves ``@connections`` the same way). One client per process, made on first use (importing boto3 costs
~0.4 s); it is thread-safe, and the host calls it from a small pool of threads. Measured here: ~1 ms per call
against a local endpoint, SigV4 signing included.

A call either delivers or raises one of: :class:`ConnectionGone` (the client is gone: API Gateway's 410
GoneException; drop the connection), :class:`Throttled` (429: the connection, or the account, takes no more
for now; try again shortly), :class:`DeliveryFailed` (anything else: endpoint down, timeout, 5xx).
"""
from __future__ import annotations

import threading
from typing import Any

from tmuxi.settings import Settings, get_settings


class DeliveryFailed(Exception):
    pass


class ConnectionGone(DeliveryFailed):
    pass


class Throttled(DeliveryFailed):
    pass


_clients: dict[tuple[str, str, int], Any] = {}
_lock = threading.Lock()


def _client(settings: Settings) -> Any:
    endpoint = settings.ws_management_endpoint
    if not endpoint:
        raise DeliveryFailed("no WebSocket management endpoint is configured (TMUXI_WS_MANAGEMENT_ENDPOINT)")
    key = (endpoint, settings.aws_region, settings.ws_post_threads)
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                import boto3
                from botocore.config import Config

                # No retries here: the caller keeps its place and decides (a stalled viewer must not hold a thread);
                # short timeouts: a delivery is a local hop for API Gateway.
                config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=5,
                                max_pool_connections=settings.ws_post_threads, tcp_keepalive=True)
                client = boto3.client("apigatewaymanagementapi", endpoint_url=endpoint,
                                      region_name=settings.aws_region, config=config)
                _clients[key] = client
    return client


def _raise(exc: Exception) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "GoneException" or status == 410:
            raise ConnectionGone(code or "gone") from exc
        if code in ("LimitExceededException", "TooManyRequestsException") or status == 429:
            raise Throttled(code or "throttled") from exc
        raise DeliveryFailed(f"{code or status}: {exc}") from exc
    if isinstance(exc, BotoCoreError):
        raise DeliveryFailed(str(exc)) from exc
    raise exc


def post(connection_id: str, data: bytes, settings: Settings | None = None) -> None:
    """Send one message (at most 32 KB: API Gateway's frame limit) to a connection. Blocking."""
    client = _client(settings or get_settings())
    try:
        client.post_to_connection(ConnectionId=connection_id, Data=data)
    except Exception as exc:
        _raise(exc)


def disconnect(connection_id: str, settings: Settings | None = None) -> None:
    """Close a connection (its ``$disconnect`` runs). A connection already gone is not an error."""
    client = _client(settings or get_settings())
    try:
        client.delete_connection(ConnectionId=connection_id)
    except Exception as exc:
        try:
            _raise(exc)
        except ConnectionGone:
            return


__all__ = ["ConnectionGone", "DeliveryFailed", "Throttled", "disconnect", "post"]

"""The one settings object. Nothing else in the project reads the environment.

Every field maps to an environment variable ``TMUXI_<FIELD>`` (``env_name()`` gives the exact name, so the
CDK app and the local stack set variables by field, never by typing the string twice).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tmuxi.routes import EXEC_TIMEOUT_MAX_S, INTEGRATION_TIMEOUT_S

ENV_PREFIX = "TMUXI_"
# An exec's worst case must answer within API Gateway's integration timeout (29 s; past it the client gets a 504
# while the command may still run). The API waits on the host for the exec's timeout plus
# max(EXEC_HOST_MARGIN_S, host_timeout_s) (host_client.exec), and needs EXEC_API_RESERVE_S for its own work
# around that call (the session's lookup before it, the activity record after). The host answers within the
# margin: with on_timeout=kill it stops the command in at most 2.5 s (tmux_host/engine.py _stop_exec: Ctrl-C, SIGTERM
# 1 s later, SIGKILL 1 s after that, 0.5 s for it to go) and, for a shell that draws no prompt mark, asks for its $?
# (1 s). By default the command is not stopped: the answer comes at the timeout.
EXEC_HOST_MARGIN_S = 5.0  # = host_client.EXEC_TIMEOUT_MARGIN_S (tests/integration/test_exec_deadline.py)
EXEC_API_RESERVE_S = 2.0
_PLACEHOLDERS = {"", "changeme", "change-me", "secret", "password", "dev", "development", "test"}


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (raises KeyError for an unknown field)."""
    if field not in Settings.model_fields:
        raise KeyError(field)
    return ENV_PREFIX + field.upper()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    environment: Literal["development", "test", "staging", "production"] = "development"
    log_level: str = "INFO"
    service_name: str = "tmuxi"

    # --- PostgreSQL: the system of record. None -> embedded PostgreSQL under data_dir (local stack only).
    database_url: SecretStr | None = None
    # Sized for Lambda: an execution environment serves one request at a time, so it opens one connection, on
    # first use (0 kept open: nothing connects at a cold start or before a SnapStart snapshot); the second is
    # headroom, never opened by sequential requests. Processes serving requests in threads (the local gateway's
    # workers, the tmux host) need more: the local stack gives them 10 (db/pool.py).
    db_pool_min: int = Field(0, ge=0)
    db_pool_max: int = Field(2, ge=1)
    # The longest a request waits for a connection, a new one included (a healthy connect takes ~5 ms here).
    db_timeout_s: float = Field(1.0, gt=0)
    # Server side, on every connection; the client gives up on a connection still busy 0.5 s past it (a paused
    # or vanished server cancels nothing): the longest one use of a connection can take.
    db_statement_timeout_s: float = Field(2.0, gt=0, le=20)
    # A pooled connection idle longer than this is checked (one empty query) before a request gets it.
    db_check_idle_s: float = Field(1.0, ge=0)
    # Circuit breaker: once PostgreSQL is found unreachable every request is refused at once (503, Retry-After)
    # and one request per db_retry_s probes it, waiting at most db_probe_timeout_s for a connection.
    db_retry_s: float = Field(1.0, gt=0, le=60)
    db_probe_timeout_s: float = Field(0.1, gt=0, le=5)
    data_dir: Path = Path(".data")

    # --- Redis: cache, revocations, rate limits, host registry. Not on the critical path.
    redis_url: str | None = None
    redis_timeout_s: float = Field(0.25, gt=0)
    redis_retry_after_s: float = Field(1.0, ge=0)
    # session entries are invalidated on every change (and by the generation after a missed one): the TTL only
    # bounds Redis memory, and is what cached reads have while PostgreSQL is down
    cache_ttl_s: int = Field(600, ge=1)

    # --- Secrets in AWS Secrets Manager (tmuxi/secrets.py), named instead of given: in AWS no secret is in an
    # environment variable or a template. Set, an id wins over the value field; fetched on first use (never at
    # import or before a SnapStart snapshot) and cached this long; a refused database or Redis password fetches
    # anew at once (rotation).
    # Two secrets, so that what holds one need not hold the other (the hosts never read the JWT key; Secrets
    # Manager also generates one random field per secret).
    jwt_secret_id: str | None = None  # JSON {"jwt_secret": ...}
    host_secret_id: str | None = None  # JSON {"host_secret": ...}
    database_secret_id: str | None = None  # RDS's JSON: username, password[, host, port, dbname] over database_url
    redis_secret_id: str | None = None  # JSON {"auth_token": ...}; redis_url then carries no password
    secrets_max_age_s: int = Field(300, ge=0, le=86400)

    # --- Auth (RFC 8725: one pinned algorithm; exp, aud, iss always checked)
    jwt_secret: SecretStr | None = None
    jwt_issuer: str = "tmuxi"
    jwt_audience: str = "tmuxi-api"
    jwt_ttl_s: int = Field(3600, ge=60, le=86400)
    # A change to a user (disabled, deleted, new role or password, all tokens ended) reaches every process on its
    # next request when the writer reaches Redis; otherwise within this long (the lifetime of a user's cached
    # state, in Redis and, while Redis is down, in each process).
    user_state_ttl_s: float = Field(2.0, gt=0, le=30)

    # --- Limits
    session_quota: int = Field(20, ge=1)
    rate_limit_per_minute: int = Field(1200, ge=1)
    # How many processes serve one caller at once (0: the local gateway's worker count; in AWS, the API function's
    # reserved concurrency). While Redis is down each process holds a caller to its share of the limit, so that
    # across an outage the limit is exceeded at most twice over (cache.py, "rate limits while Redis is down").
    rate_limit_processes: int = Field(0, ge=0, le=100_000)
    # Unauthenticated routes (/health, /auth/health, /openapi.json, /docs, POST /auth/token): requests per
    # source address per minute (services/throttle.py).
    public_rate_limit_per_minute: int = Field(120, ge=1)
    # Failed logins (services/throttle.py): per username and per source address, the first failures within the
    # window are free; each further one locks that username / address out of logging in for base, 2 x base,
    # 4 x base ... at most max seconds. A failure-free window forgets the count; a login clears its username's.
    login_free_failures: int = Field(5, ge=1)
    login_source_free_failures: int = Field(30, ge=1)
    login_failure_window_s: int = Field(900, ge=1)
    login_lockout_base_s: float = Field(1.0, gt=0)
    login_lockout_max_s: float = Field(900.0, gt=0)
    max_input_bytes: int = Field(65536, ge=1)
    max_command_bytes: int = Field(4 << 20, ge=1)  # as large as a file may be (max_file_bytes)
    max_body_bytes: int = Field(262144, ge=1024)
    exec_timeout_default_s: float = Field(20.0, gt=0, le=EXEC_TIMEOUT_MAX_S)
    # 20 + max(5, host_timeout_s 5) + 2 = 27 s at worst (exec_worst_case_s), within API Gateway's 29 s
    exec_timeout_max_s: float = Field(20.0, gt=0, le=EXEC_TIMEOUT_MAX_S)
    exec_max_output_bytes: int = Field(1 << 20, ge=1024)

    # --- Tmux host (the long-running service)
    host_secret: SecretStr | None = None
    host_id: str = Field("host-1", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\z")  # (Rust regex) \z: end of text
    host_bind: str = "127.0.0.1"
    host_port: int = Field(7001, ge=0, le=65535)
    host_url: str | None = None  # advertised URL; default http://{host_bind}:{host_port}
    host_capacity: int = Field(500, ge=1)
    host_timeout_s: float = Field(5.0, gt=0)  # each call to a host; an exec's: its timeout + max(5, this)
    # How long a lone tmux command (input, resize) reads its reply on the spot before yielding to the event
    # loop (0: never): tmux answers in ~20 us, a sleep/wake-up through the loop costs ~70 us more.
    control_spin_us: int = Field(200, ge=0, le=5000)
    socket_dir: Path | None = None  # default /tmp/tmuxi-<uid>; must be short (unix socket paths < 100 bytes)
    # How long a tmux server may take to answer one command before its control connection is dropped (a user
    # can stop their own server with `kill -STOP`; only their sessions wait, and only this long).
    control_timeout_s: float = Field(5.0, gt=0, le=60)
    heartbeat_interval_s: float = Field(5.0, gt=0)
    host_dead_after_s: float = Field(15.0, gt=0)
    # how often scheduled reconciliation runs (EventBridge: rate(1 minute); the local stack's scheduler: this)
    reconcile_interval_s: float = Field(60.0, gt=0)
    # --- Scheduled maintenance (functions/maintenance/handler.py, services/maintenance.py; schedules:
    # tmuxi/schedules.py). A session with no activity (API input, resize, exec; WebSocket keystrokes or a viewer
    # attached, reported by its host's heartbeat) for session_idle_timeout_s is deleted by `cleanup` (20 minutes:
    # AWS Session Manager's default idle timeout); one older than session_max_lifetime_s is deleted whatever its
    # activity (0: no maximum, as Session Manager's maximum session duration is unset by default).
    session_idle_timeout_s: int = Field(1200, ge=60)
    session_max_lifetime_s: int = Field(0, ge=0)
    # `retention`: audit events (and maintenance run records) older than this many days are deleted; ended
    # sessions (deleted, failed, exited, lost) once they ended this many days ago
    audit_retention_days: int = Field(90, ge=1)
    ended_session_retention_days: int = Field(30, ge=1)
    # rows per statement when maintenance deletes or ends many (each batch is one short transaction)
    maintenance_batch_size: int = Field(1000, ge=1, le=10_000)
    # The local stack's scheduler only: the tasks it runs (comma-separated; None: every task of SCHEDULES;
    # "none": none, e.g. a benchmark that runs a task itself)
    scheduler_tasks: str | None = None
    shell: str = "/bin/bash"
    # --- The host as an ECS service (README "Deploys, scale-in and sessions"). ECS sets ECS_AGENT_URI in every task
    # (its agent's endpoint; TMUXI_ECS_AGENT_URI overrides it). Set: the host protects its task from scale-in while it
    # holds sessions (tmux_host/protection.py), and on SIGTERM drains (tmux_host/drain.py) for at most drain_timeout_s:
    # no new sessions, viewers told, sessions still open then recorded `lost`. The task's containers, the users'
    # tmux servers among them, are stopped with it. Unset (the local stack, a host restarted in place): SIGTERM
    # detaches and the sessions outlive the process for the next run to adopt. ECS Fargate's stopTimeout is at most
    # 120 s: the CDK app gives drain_timeout_s + 20 (what the host does after its drain: at most ~20 s).
    ecs_agent_uri: str | None = Field(None, validation_alias=AliasChoices("TMUXI_ECS_AGENT_URI", "ECS_AGENT_URI"))
    # ECS's task metadata endpoint (set in every task): a host there takes its id (the task's id) and its advertised
    # URL (the task's private address) from it, unless TMUXI_HOST_ID / TMUXI_HOST_URL are given (tmux_host/ecs.py).
    ecs_container_metadata_uri: str | None = Field(None, validation_alias=AliasChoices(
        "TMUXI_ECS_CONTAINER_METADATA_URI", "ECS_CONTAINER_METADATA_URI_V4"))
    drain_timeout_s: float = Field(100.0, ge=0, le=100)
    default_cols: int = Field(120, ge=10, le=1000)
    default_rows: int = Field(40, ge=5, le=500)

    # --- Live terminals over WebSocket (docs/websocket.md)
    # A connect ticket (POST /ws/tickets) is single-use and expires this soon: it only has to survive the moment
    # between minting it and opening the WebSocket.
    ws_ticket_ttl_s: int = Field(30, ge=5, le=300)
    # Read-only share links (POST /sessions/{id}/shares): the longest expiry an owner may give one.
    ws_share_max_ttl_s: int = Field(7 * 86400, ge=60)
    # Where hosts post output (the API Gateway Management API: https://{api-id}.execute-api.{region}.amazonaws.com/
    # {stage}; the local stack: its gateway's URL). None: no live output is delivered.
    ws_management_endpoint: str | None = None
    aws_region: str = "us-east-1"
    # Per session, the host keeps this much of its recent output for viewers who fall behind or reconnect; older
    # bytes are replaced by a fresh screen (a "gap").
    stream_buffer_bytes: int = Field(1 << 20, ge=64 * 1024, le=64 << 20)
    # tmux pauses a pane whose output the host has not read for this long (refresh-client -f pause-after); the
    # viewers are re-synchronised with a fresh screen when it continues.
    stream_pause_after_s: int = Field(5, ge=1, le=300)
    # The largest output frame (API Gateway WebSocket frames are at most 32 KB; JSON + base64 of 24,000 bytes
    # fits).
    ws_frame_data_bytes: int = Field(24_000, ge=1024, le=24_000)
    # Concurrent post_to_connection calls from one host (each is a blocking boto3 call in a thread).
    ws_post_threads: int = Field(16, ge=1, le=256)
    # Local gateway only (it emulates API Gateway's `$default` HTTP integration over a VPC link to the hosts' NLB):
    # the hosts' URLs, comma-separated, taken in turn as an NLB spreads requests.
    gateway_ws_targets: str | None = None

    # --- Recordings: every session's output as asciicast v2
    # "s3://bucket/prefix" or a local directory (default <data_dir>/recordings).
    recordings_url: str | None = None
    s3_endpoint_url: str | None = None  # tests: a moto server
    # One recording (one session on one host run) stops growing past this; a marker says so.
    recording_max_bytes: int = Field(64 << 20, ge=1 << 20)

    # --- Backups: logical exports of the database (services/backup.py, `python -m ops.backup_cmds`)
    # "s3://bucket/prefix" or a local directory (default <data_dir>/backups); s3_endpoint_url applies here too.
    backups_url: str | None = None

    # --- Containment of users' shells (README "Security model")
    # auto: each user's shells run as an OS account of their own whenever the host can switch users (root, or
    # CAP_SETUID + CAP_SETGID), else everything runs as the host's own user, with a loud warning (development
    # only). required: refuse to start without it (always so in staging and production). off: never (development).
    isolation: Literal["auto", "required", "off"] = "auto"
    home_dir: Path | None = None  # users' homes; default <data_dir>/homes/<host_id>
    account_uid_base: int = Field(200_000, ge=1000, le=2**31 - 2**24)  # account N runs as uid/gid base + N
    # Per-user limits on one host. Processes, memory and tmux memory are enforced by the user's cgroup where the
    # host can write cgroups, and by per-process limits (RLIMIT_NPROC / RLIMIT_AS) where it cannot.
    user_max_processes: int = Field(256, ge=8)
    user_memory_mb: int = Field(2048, ge=64)
    user_max_file_mb: int = Field(1024, ge=1)  # largest file one of their processes may write (RLIMIT_FSIZE)
    user_max_open_files: int = Field(1024, ge=64)
    user_tmux_memory_mb: int = Field(256, ge=16)  # input is refused while their tmux server holds more
    shell_oom_score_adj: int = Field(500, ge=0, le=1000)  # the OOM killer takes shells before the services

    # --- Local gateway
    gateway_bind: str = "127.0.0.1"
    gateway_port: int = Field(8080, ge=0, le=65535)
    # Worker processes of the local gateway, like concurrent Lambda execution environments (0: one per core).
    gateway_workers: int = Field(0, ge=0, le=64)
    # The local WebSocket API (one process: it holds the connections and serves @connections, as API Gateway's
    # WebSocket API is an endpoint of its own)
    gateway_ws_port: int = Field(8081, ge=0, le=65535)
    # The REST gateway's worker processes write their Prometheus metrics here (prometheus_client's multiprocess
    # mode: the stack sets PROMETHEUS_MULTIPROC_DIR for them); the WebSocket gateway serves them at /metrics/rest.
    gateway_metrics_dir: Path | None = None

    # --- Incident notifications (the alerts function, services/incidents.py): the guide's initial, update and
    # resolution messages, posted as Slack-style JSON {"text": ...} to a webhook. The URL is a credential (whoever
    # holds a Slack webhook URL can post to the channel): in AWS name a secret, JSON {"url": ...}, instead; the id
    # wins. Neither set: incidents are recorded, no message is sent.
    alert_webhook_url: SecretStr | None = None
    alert_webhook_secret_id: str | None = None
    # Each attempt (two at most: one retry) waits this long; the alerts function's 60 s timeout covers both.
    alert_webhook_timeout_s: float = Field(5.0, gt=0, le=10)

    # --- Files in a session's home (PUT/GET /sessions/{id}/files, tmux_host/files.py): the largest file written or
    # read. 4 MiB: in base64 (x 4/3) in a JSON body or answer it stays within Lambda's 6 MB synchronous payload.
    max_file_bytes: int = Field(4 << 20, ge=1024, le=4 << 20)

    # --- MCP (tmuxi/mcp): the tools call the REST API with the caller's own token. api_url: the REST API's base URL
    # (the mcp function: in AWS the stage's URL, built from the RestApi id; locally the gateway's own URL; the stdio
    # server: its default for --api-url). token: the stdio server's bearer token (the user's own; an environment
    # variable, never an argument or a URL, which other users' `ps` could read).
    api_url: str | None = None
    token: SecretStr | None = None

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.environment in ("staging", "production"):
            for name in ("jwt_secret", "host_secret"):
                value = getattr(self, name)
                if getattr(self, f"{name}_id"):  # the value is Secrets Manager's (generated there)
                    continue
                if value is None or value.get_secret_value().lower() in _PLACEHOLDERS or len(
                    value.get_secret_value()
                ) < 32:
                    raise ValueError(
                        f"{env_name(name)} must be set to a random value of at least 32 characters "
                        f"in {self.environment} (or {env_name(name + '_id')} to a secret holding it)"
                    )
            if self.database_url is None and not self.database_secret_id:
                raise ValueError(f"{env_name('database_url')} or {env_name('database_secret_id')} is required in "
                                 f"{self.environment}")
            if self.isolation == "off":
                raise ValueError(f"{env_name('isolation')}=off is for development only, not {self.environment}")
        return self

    @model_validator(mode="after")
    def _refuse_an_exec_past_api_gateways_timeout(self) -> Settings:
        worst = self.exec_worst_case_s
        if worst <= INTEGRATION_TIMEOUT_S:
            return self
        max_name, host_name = env_name("exec_timeout_max_s"), env_name("host_timeout_s")
        budget = INTEGRATION_TIMEOUT_S - EXEC_API_RESERVE_S  # for the exec and the API's wait on the host
        fixes = []
        if budget - max(EXEC_HOST_MARGIN_S, self.host_timeout_s) > 0:
            fixes.append(f"{max_name} to at most {budget - max(EXEC_HOST_MARGIN_S, self.host_timeout_s):g}")
        if self.host_timeout_s > EXEC_HOST_MARGIN_S and budget - self.exec_timeout_max_s >= EXEC_HOST_MARGIN_S:
            fixes.append(f"{host_name} to at most {budget - self.exec_timeout_max_s:g}")
        if not fixes:
            fixes.append(f"{host_name} to at most {EXEC_HOST_MARGIN_S:g} and {max_name} to at most "
                         f"{budget - EXEC_HOST_MARGIN_S:g}")
        raise ValueError(
            f"an exec could take {worst:g} s to answer: {max_name}={self.exec_timeout_max_s:g}, plus the API's wait "
            f"on the host past it (the larger of {EXEC_HOST_MARGIN_S:g} s and {host_name}={self.host_timeout_s:g}), "
            f"plus {EXEC_API_RESERVE_S:g} s for the API's own work; API Gateway gives up after "
            f"{INTEGRATION_TIMEOUT_S:g} s (504). Set " + " or ".join(fixes)
        )

    # Derived values -----------------------------------------------------------------------------
    @property
    def exec_worst_case_s(self) -> float:
        """The longest an exec can take to answer through the API (see EXEC_API_RESERVE_S): at most API
        Gateway's integration timeout (enforced above)."""
        return self.exec_timeout_max_s + max(EXEC_HOST_MARGIN_S, self.host_timeout_s) + EXEC_API_RESERVE_S

    @property
    def max_file_body_bytes(self) -> int:
        """The largest PUT /sessions/{id}/files body the API reads: the file in base64, its path (JSON-escaped) and
        the JSON around them."""
        return 4 * ((self.max_file_bytes + 2) // 3) + 32768

    @property
    def advertised_host_url(self) -> str:
        return self.host_url or f"http://{self.host_bind}:{self.host_port}"

    @property
    def resolved_recordings_url(self) -> str:
        return self.recordings_url or str((self.data_dir / "recordings").absolute())

    @property
    def isolation_required(self) -> bool:
        return self.isolation == "required" or self.environment in ("staging", "production")

    @property
    def resolved_home_dir(self) -> Path:
        return (self.home_dir or self.data_dir / "homes" / self.host_id).absolute()

    @property
    def resolved_gateway_workers(self) -> int:
        return self.gateway_workers or os.cpu_count() or 1

    @property
    def resolved_rate_limit_processes(self) -> int:
        return self.rate_limit_processes or self.resolved_gateway_workers

    @property
    def resolved_socket_dir(self) -> Path:
        return self.socket_dir or Path(f"/tmp/tmuxi-{os.getuid()}")  # noqa: S108 - private 0700 dir

    def require_jwt_secret(self) -> str:
        if self.jwt_secret_id:
            from tmuxi import secrets

            return secrets.app_value("jwt_secret")
        if self.jwt_secret is None:
            raise RuntimeError(f"{env_name('jwt_secret')} is not set (`make run` generates one for development)")
        return self.jwt_secret.get_secret_value()

    def require_host_secret(self) -> str:
        if self.host_secret_id:
            from tmuxi import secrets

            return secrets.app_value("host_secret")
        if self.host_secret is None:
            raise RuntimeError(f"{env_name('host_secret')} is not set (`make run` generates one for development)")
        return self.host_secret.get_secret_value()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

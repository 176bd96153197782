"""Per-environment configuration, read from cdk.json's context (``tmuxi:environments``).

Everything that differs between dev, staging and prod (sizes, retention, thresholds, schedules, alarm targets) is
a field here with its value in cdk.json; the constructs read only this object. ``cdk synth -c
tmuxi:environments='{...}'`` or editing cdk.json changes an environment; an unknown or missing key fails synthesis
with its name.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

CONTEXT_KEY = "tmuxi:environments"
ENVIRONMENTS = ("dev", "staging", "prod")


@dataclass(frozen=True, kw_only=True)
class EnvConfig:
    name: str
    # TMUXI_ENVIRONMENT: staging and production refuse placeholder secrets and running shells without isolation
    settings_environment: Literal["development", "staging", "production"]
    account: str | None = None  # None: the account of the credentials `cdk deploy` runs with
    region: str
    # network
    max_azs: int
    nat_gateways: int
    # PostgreSQL (RDS)
    db_instance_type: str  # e.g. "t4g.micro" (ec2.InstanceType)
    db_allocated_storage_gb: int
    db_max_allocated_storage_gb: int
    db_multi_az: bool
    db_backup_retention_days: int
    db_deletion_protection: bool
    db_secret_rotation_days: int
    # Redis (ElastiCache)
    redis_node_type: str  # e.g. "cache.t4g.micro"
    redis_replicas: int  # read replicas besides the primary (>= 1 gives automatic failover)
    # tmux host (ECS Fargate)
    host_cpu: int  # Fargate CPU units (1024 = 1 vCPU)
    host_memory_mib: int
    host_min_tasks: int
    host_max_tasks: int
    host_capacity: int  # sessions one task accepts (TMUXI_HOST_CAPACITY)
    host_sessions_target: int  # autoscaling: average sessions per task to track
    host_cpu_target_percent: int  # autoscaling: average CPU to track
    host_drain_timeout_s: int  # TMUXI_DRAIN_TIMEOUT_S; the task's stopTimeout leaves it 20 s more (max 120)
    # Lambda
    api_memory_mb: int
    function_memory_mb: int  # authorizer, ws, maintenance, alerts, migrate
    # also TMUXI_RATE_LIMIT_PROCESSES (cache.py: rate limits while Redis is down)
    api_reserved_concurrency: int | None = None
    # REST API stage
    throttle_rate_limit: int  # requests per second, steady
    throttle_burst_limit: int
    # logs and data lifetimes
    log_retention_days: int
    recordings_expire_days: int
    recordings_infrequent_access_days: int
    backups_expire_days: int
    removal_policy: Literal["destroy", "retain"]  # data stores and buckets when the stack is deleted
    # alarms (operations guide, "Alert Configurations"): thresholds and where notifications go
    alarm_email: str | None = None  # also subscribed to the alarm topic
    # EventBridge schedules of the maintenance function: tmuxi.schedules.SCHEDULES (the local scheduler's too),
    # with this environment's overrides (task -> rate expression) laid over it
    schedule_overrides: dict[str, str] = field(default_factory=dict)
    alarm_error_rate: float  # fraction of requests answered 5xx (guide: 0.01 over 2 minutes)
    alarm_p95_latency_ms: int  # API Gateway latency p95 (the guide's 15 ms is the service's own time; see README)
    alarm_memory_percent: int
    alarm_cpu_percent: int

    @classmethod
    def from_context(cls, name: str, raw: Any) -> EnvConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"cdk.json context {CONTEXT_KEY}.{name} must be an object, not {type(raw).__name__}")
        # (CDK drops null context values: a field that may be None may be absent)
        known = {f.name for f in fields(cls)} - {"name"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - {"name"}
        unknown, missing = set(raw) - known, required - set(raw)
        if unknown or missing:
            raise ValueError(f"cdk.json context {CONTEXT_KEY}.{name}: unknown keys {sorted(unknown)}, "
                             f"missing keys {sorted(missing)}")
        cfg = cls(name=name, **raw)
        if not 0 < cfg.host_drain_timeout_s <= 100:
            raise ValueError(f"{name}: host_drain_timeout_s must be in 1..100 (Fargate's stopTimeout is at most "
                             "120 s, and the host needs 20 s after draining)")
        if cfg.host_min_tasks < 1 or cfg.host_max_tasks < cfg.host_min_tasks:
            raise ValueError(f"{name}: need 1 <= host_min_tasks <= host_max_tasks")
        return cfg

    @property
    def schedules(self) -> dict[str, str]:
        from tmuxi.schedules import SCHEDULES, rate_seconds

        merged = {**SCHEDULES, **self.schedule_overrides}
        for task, expression in merged.items():
            if task not in SCHEDULES:
                raise ValueError(f"{self.name}: schedule_overrides names {task!r}, which is no maintenance task "
                                 f"(tmuxi.schedules.SCHEDULES: {sorted(SCHEDULES)})")
            rate_seconds(expression)  # a malformed expression fails synthesis, naming it
        return merged

    @property
    def retain(self) -> bool:
        return self.removal_policy == "retain"


def load(context: Any) -> dict[str, EnvConfig]:
    if not isinstance(context, dict) or not context:
        raise ValueError(f"cdk.json has no context {CONTEXT_KEY!r}: run from the repository root (cdk.json)")
    return {name: EnvConfig.from_context(name, raw) for name, raw in context.items()}

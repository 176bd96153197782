"""Alarms for the operations guide's alert rules, the alarm topic wired to the alerts function, the maintenance
schedules, and a dashboard with the guide's panels.

Every alarm names its guide rule and severity in its description (``severity=critical rule=ServiceDown``), which
the alerts function reads to open the incident at the guide's priority (critical -> P1, warning -> P3).
"""
from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from cdk.config import EnvConfig
from cdk.data import Cache, Database
from cdk.host import Host, sessions_metric


@dataclass(frozen=True)
class Rule:
    """One alert rule of the guide, as a CloudWatch alarm."""

    name: str  # the guide's alert name
    severity: str  # "critical" | "warning"
    summary: str


# The guide's rules (operations-guide.md, "Alert Configurations") on the metrics AWS has for this design.
RULES = {
    "ServiceDown": Rule("ServiceDown", "critical", "no healthy tmux host behind the NLB"),
    "HighErrorRate": Rule("HighErrorRate", "critical", "REST API 5xx rate above the threshold for 2 minutes"),
    "DatabaseDown": Rule("DatabaseDown", "critical", "PostgreSQL reports no metrics (unreachable or stopped)"),
    "RedisDown": Rule("RedisDown", "critical", "Redis reports no metrics (unreachable or stopped)"),
    "HighResponseTime": Rule("HighResponseTime", "warning", "REST API p95 latency above the threshold for 5 minutes"),
    "HighMemoryUsage": Rule("HighMemoryUsage", "warning", "tmux hosts' memory above the threshold for 5 minutes"),
    "HighCPUUsage": Rule("HighCPUUsage", "warning", "tmux hosts' CPU above the threshold for 10 minutes"),
    "HostCrashLooping": Rule("HostCrashLooping", "warning",
                             "a tmux host target is failing health checks (the guide's PodCrashLooping)"),
    "FunctionErrors": Rule("FunctionErrors", "warning", "a Lambda function's invocations are failing"),
}
MINUTE = Duration.minutes(1)


class Monitoring(Construct):
    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig, key: kms.IKey, alerts: lambda_.IFunction,
                 maintenance: lambda_.IFunction, functions: dict[str, lambda_.IFunction], rest: apigw.RestApi,
                 host: Host, database: Database, cache: Cache) -> None:
        super().__init__(scope, cid)
        self.topic = sns.Topic(self, "Alarms", display_name=f"tmuxi {config.name} alarms", master_key=key,
                               enforce_ssl=True)
        key.grant_encrypt_decrypt(iam.ServicePrincipal("cloudwatch.amazonaws.com"))
        self.topic.add_subscription(subscriptions.LambdaSubscription(alerts))
        if config.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))
        action = cw_actions.SnsAction(self.topic)
        self.alarms: dict[str, cw.Alarm] = {}

        def alarm(rule: str, metric: cw.IMetric, threshold: float, periods: int,
                  comparison: cw.ComparisonOperator, missing: cw.TreatMissingData,
                  construct_id: str | None = None) -> cw.Alarm:
            r = RULES[rule]
            a = cw.Alarm(self, construct_id or rule, alarm_name=f"tmuxi-{config.name}-{construct_id or rule}",
                         alarm_description=f"severity={r.severity} rule={r.name}: {r.summary}",
                         metric=metric, threshold=threshold, evaluation_periods=periods,
                         datapoints_to_alarm=periods, comparison_operator=comparison, treat_missing_data=missing)
            a.add_alarm_action(action)
            a.add_ok_action(action)  # the alerts function resolves the incident
            self.alarms[construct_id or rule] = a
            return a

        gt, lt = cw.ComparisonOperator.GREATER_THAN_THRESHOLD, cw.ComparisonOperator.LESS_THAN_THRESHOLD
        breaching, not_breaching = cw.TreatMissingData.BREACHING, cw.TreatMissingData.NOT_BREACHING
        # up{job="tmux-service"} == 0 for 30s -> no healthy target for a minute (the shortest standard period)
        healthy = host.target_group.metrics.healthy_host_count(period=MINUTE, statistic="Minimum")
        alarm("ServiceDown", healthy, 1, 1, lt, breaching)
        # rate(tmux_errors_total[5m]) > 0.01 for 2m -> the fraction of requests answered 5xx
        server_errors = rest.metric_server_error(period=MINUTE, statistic="Average")
        alarm("HighErrorRate", server_errors, config.alarm_error_rate, 2, gt, not_breaching)
        # postgres_up == 0 / redis_up == 0 for 1m -> the store stopped publishing its metrics
        alarm("DatabaseDown", database.instance.metric_database_connections(period=MINUTE, statistic="SampleCount"),
              1, 1, lt, breaching)
        redis_metric = cw.Metric(namespace="AWS/ElastiCache", metric_name="EngineCPUUtilization",
                                 dimensions_map={"ReplicationGroupId": cache.group.ref}, period=MINUTE,
                                 statistic="SampleCount")
        alarm("RedisDown", redis_metric, 1, 1, lt, breaching)
        # histogram_quantile(0.95, tmux_request_duration_seconds) > threshold for 5m
        alarm("HighResponseTime", rest.metric_latency(period=MINUTE, statistic="p95"), config.alarm_p95_latency_ms,
              5, gt, not_breaching)
        alarm("HighMemoryUsage", host.service.metric_memory_utilization(period=MINUTE),
              config.alarm_memory_percent, 5, gt, not_breaching)
        alarm("HighCPUUsage", host.service.metric_cpu_utilization(period=MINUTE), config.alarm_cpu_percent, 10, gt,
              not_breaching)
        alarm("HostCrashLooping", host.target_group.metrics.un_healthy_host_count(period=MINUTE, statistic="Maximum"),
              0, 5, gt, not_breaching)
        for name, fn in functions.items():
            alarm("FunctionErrors", fn.metric_errors(period=Duration.minutes(5), statistic="Sum"), 0, 1, gt,
                  not_breaching, construct_id=f"FunctionErrors-{name}")

        # EventBridge schedules of the maintenance function, one rule per task (its constant input names it)
        self.schedules: dict[str, events.Rule] = {}
        for task, expression in config.schedules.items():
            self.schedules[task] = events.Rule(
                self, f"Schedule-{task}", schedule=events.Schedule.expression(expression),
                description=f"tmuxi maintenance: {task}",
                targets=[targets.LambdaFunction(maintenance, event=events.RuleTargetInput.from_object({"task": task}),
                                                retry_attempts=2, max_event_age=Duration.minutes(5))])

        # The guide's main dashboard: service health, request rate, response time, active sessions, error rate
        self.dashboard = cw.Dashboard(self, "Dashboard", dashboard_name=f"tmuxi-{config.name}")
        self.dashboard.add_widgets(
            cw.SingleValueWidget(title="Service Health", metrics=[healthy], width=6),
            cw.GraphWidget(title="Request Rate", left=[rest.metric_count(period=MINUTE, statistic="Sum")], width=9),
            cw.GraphWidget(title="Response Time", left=[rest.metric_latency(period=MINUTE, statistic="p95"),
                                                        rest.metric_latency(period=MINUTE, statistic="p50")], width=9),
        )
        self.dashboard.add_widgets(
            cw.GraphWidget(title="Active Sessions", left=[sessions_metric(config).with_(statistic="Sum")], width=8),
            cw.GraphWidget(title="Error Rate", left=[server_errors,
                                                     rest.metric_client_error(period=MINUTE, statistic="Average")],
                           width=8),
            cw.AlarmStatusWidget(title="Alarms", alarms=list(self.alarms.values()), width=8),
        )

"""The tmux host: an ECS Fargate service built from the repository's Dockerfile, behind an internal NLB (the
WebSocket API's `$default` route reaches it over a VPC link), scaled on sessions per task and on CPU.

Sessions are never killed silently (README "Deploys, scale-in and sessions"): a task holding sessions protects
itself from scale-in (ECS task scale-in protection, which deployments respect too); a task told to stop drains
for ``host_drain_timeout_s`` (no new placements, viewers told) inside a stopTimeout 20 s longer; deployments start
new tasks before stopping old ones (100% / 200%).
"""
from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from cdk_nag import NagSuppressions
from constructs import Construct

from cdk.config import EnvConfig
from cdk.data import Network, retention
from cdk.names import HOST_CONTAINER, HOST_PORT, METRICS_NAMESPACE, NLB_PORT, ROOT

# Docker's default capabilities (what Fargate gives a container; it lets a task add only SYS_PTRACE). The host
# keeps CHOWN, FOWNER, KILL, SETGID and SETUID (tmux_host/accounts.py HOST_CAPABILITIES: switching to users'
# accounts, giving them their directories, ending their processes) and drops the rest.
DOCKER_DEFAULT_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "NET_RAW",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
HOST_KEEPS = frozenset({"CHOWN", "FOWNER", "KILL", "SETGID", "SETUID"})
DROPPED_CAPABILITIES = tuple(sorted(DOCKER_DEFAULT_CAPABILITIES - HOST_KEEPS))
STOP_MARGIN_S = 20  # after draining: recording the lost sessions, uploading recordings, exiting (tmux_host/drain.py)


def sessions_metric(config: EnvConfig) -> cloudwatch.Metric:
    """Sessions per task: every host publishes ``tmux_active_sessions`` each heartbeat (EMF); the average over the
    tasks is what autoscaling tracks."""
    return cloudwatch.Metric(namespace=METRICS_NAMESPACE, metric_name="tmux_active_sessions",
                             dimensions_map={"service": "tmux-host", "environment": config.settings_environment},
                             statistic="Average", period=Duration.minutes(1))


class Host(Construct):
    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig, network: Network,
                 environment: dict[str, str]) -> None:
        super().__init__(scope, cid)
        self.cluster = ecs.Cluster(self, "Cluster", vpc=network.vpc,
                                   container_insights_v2=ecs.ContainerInsights.ENHANCED)
        self.task_definition = ecs.FargateTaskDefinition(
            self, "Task", cpu=config.host_cpu, memory_limit_mib=config.host_memory_mib,
            runtime_platform=ecs.RuntimePlatform(cpu_architecture=ecs.CpuArchitecture.ARM64,
                                                 operating_system_family=ecs.OperatingSystemFamily.LINUX))
        log_group = logs.LogGroup(self, "Logs", retention=retention(config.log_retention_days),
                                  removal_policy=RemovalPolicy.DESTROY)
        linux = ecs.LinuxParameters(self, "Linux", init_process_enabled=True)  # reaps users' orphaned processes
        linux.drop_capabilities(*(ecs.Capability[c] for c in DROPPED_CAPABILITIES))
        self.container = self.task_definition.add_container(
            HOST_CONTAINER,
            image=ecs.ContainerImage.from_asset(str(ROOT), platform=ecr_assets.Platform.LINUX_ARM64,
                                                file="Dockerfile"),
            environment=environment, logging=ecs.LogDrivers.aws_logs(stream_prefix="host", log_group=log_group),
            port_mappings=[ecs.PortMapping(container_port=HOST_PORT)], linux_parameters=linux,
            privileged=False, stop_timeout=Duration.seconds(config.host_drain_timeout_s + STOP_MARGIN_S),
            # /health answers 503 only when users' shells cannot be isolated: a host that cannot ever serve
            health_check=ecs.HealthCheck(
                command=["CMD", "python3", "-c",
                         f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{HOST_PORT}/health', "
                         "timeout=4)"],
                interval=Duration.seconds(15), timeout=Duration.seconds(5), retries=3,
                start_period=Duration.seconds(30)),
        )
        self.service = ecs.FargateService(
            self, "Service", cluster=self.cluster, task_definition=self.task_definition,
            min_healthy_percent=100, max_healthy_percent=200,
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            vpc_subnets=network.private, security_groups=[network.hosts_sg], assign_public_ip=False,
            health_check_grace_period=Duration.seconds(60), enable_ecs_managed_tags=True,
            propagate_tags=ecs.PropagatedTagSource.SERVICE)
        # The ECS agent's task-protection endpoint acts with the task role on this task only.
        stack = Stack.of(self)
        self.task_definition.task_role.add_to_principal_policy(iam.PolicyStatement(
            actions=["ecs:UpdateTaskProtection", "ecs:GetTaskProtection"],
            resources=[stack.format_arn(service="ecs", resource="task",
                                        resource_name=f"{self.cluster.cluster_name}/*")]))

        scaling = self.service.auto_scale_task_count(min_capacity=config.host_min_tasks,
                                                     max_capacity=config.host_max_tasks)
        scaling.scale_on_cpu_utilization("Cpu", target_utilization_percent=config.host_cpu_target_percent,
                                         scale_in_cooldown=Duration.minutes(10), scale_out_cooldown=Duration.minutes(2))
        scaling.scale_to_track_custom_metric("Sessions", metric=sessions_metric(config),
                                             target_value=config.host_sessions_target,
                                             scale_in_cooldown=Duration.minutes(10),
                                             scale_out_cooldown=Duration.minutes(2))

        # The WebSocket API's `$default` route: API Gateway -> VPC link -> this NLB -> a host. The NLB's group has
        # no inbound rule: only the VPC link's PrivateLink traffic enters.
        self.nlb = elbv2.NetworkLoadBalancer(
            self, "Nlb", vpc=network.vpc, internet_facing=False, vpc_subnets=network.private,
            security_groups=[network.nlb_sg], cross_zone_enabled=True,
            enforce_security_group_inbound_rules_on_private_link_traffic=False)
        listener = self.nlb.add_listener("Ws", port=NLB_PORT, protocol=elbv2.Protocol.TCP)
        self.target_group = listener.add_targets(
            "Hosts", port=HOST_PORT, protocol=elbv2.Protocol.TCP,
            targets=[self.service.load_balancer_target(container_name=HOST_CONTAINER, container_port=HOST_PORT)],
            deregistration_delay=Duration.seconds(30),
            health_check=elbv2.HealthCheck(protocol=elbv2.Protocol.HTTP, path="/health",
                                           interval=Duration.seconds(10), healthy_threshold_count=2,
                                           unhealthy_threshold_count=3))
        NagSuppressions.add_resource_suppressions(self.nlb, [{
            "id": "AwsSolutions-ELB2",
            "reason": "internal NLB carrying WebSocket messages only; the WebSocket API stage's access logs record "
                      "every message's connection, and the hosts log what they refuse"}])
        NagSuppressions.add_resource_suppressions(self.task_definition, [{
            "id": "AwsSolutions-ECS2",
            "reason": "the environment holds configuration only (names, URLs, secret ids): every secret is fetched "
                      "from Secrets Manager by id at first use (tmuxi.secrets), never set in the task"}])
        NagSuppressions.add_resource_suppressions(self.task_definition, [{
            "id": "AwsSolutions-IAM5",
            "reason": "ECR/logs actions of the execution role that AWS does not scope, the task's own protection "
                      "(tasks of this cluster: task ids are not known before they start), and X-Ray",
            "appliesTo": ["Resource::*", {"regex": "/^Resource::arn:.*:ecs:.*:task/.*\\*$/g"}]}],
            apply_to_children=True)

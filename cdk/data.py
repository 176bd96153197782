"""The network and the data stores: VPC, security groups, PostgreSQL (RDS), Redis (ElastiCache), S3 buckets and
the generated secrets.

Each data store's security group admits only what needs it (the functions' and the hosts' groups), on its one
port; nothing here has a public address.
"""
from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, SecretValue
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticache as elasticache
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_rds as rds
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as sm
from cdk_nag import NagSuppressions
from constructs import Construct

from cdk.config import EnvConfig
from cdk.names import DB_NAME, DB_USER, HOST_PORT, POSTGRES_PORT, REDIS_PORT

URL_UNSAFE = " %+~`#$&*()|[]{}:;<>?!'/@\"\\"


class Network(Construct):
    """A VPC with private subnets (the hosts, the functions, the data stores) and a security group per role."""

    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig) -> None:
        super().__init__(scope, cid)
        flow_log_group = logs.LogGroup(self, "FlowLogs", retention=retention(config.log_retention_days),
                                       removal_policy=RemovalPolicy.DESTROY)
        self.vpc = ec2.Vpc(
            self, "Vpc", max_azs=config.max_azs, nat_gateways=config.nat_gateways,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20),
                ec2.SubnetConfiguration(name="data", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=24),
            ],
            flow_logs={"all": ec2.FlowLogOptions(destination=ec2.FlowLogDestination.to_cloud_watch_logs(
                flow_log_group))},
        )
        self.private = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        self.isolated = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)

        def group(name: str, description: str, outbound: bool) -> ec2.SecurityGroup:
            return ec2.SecurityGroup(self, name, vpc=self.vpc, description=description,
                                     allow_all_outbound=outbound)

        # Functions and hosts call AWS APIs (Secrets Manager, S3, the WebSocket management API) over HTTPS.
        self.functions_sg = group("FunctionsSg", "Lambda functions", outbound=False)
        self.hosts_sg = group("HostsSg", "tmux hosts (ECS tasks)", outbound=False)
        self.nlb_sg = group("NlbSg", "the internal NLB of the hosts (WebSocket default route via the VPC link)", False)
        self.db_sg = group("DatabaseSg", "PostgreSQL: the functions and the hosts only", outbound=False)
        self.redis_sg = group("RedisSg", "Redis: the functions and the hosts only", outbound=False)
        https = ec2.Port.tcp(443)
        for sg in (self.functions_sg, self.hosts_sg):
            sg.add_egress_rule(ec2.Peer.any_ipv4(), https, "AWS APIs over HTTPS")
            sg.connections.allow_to(self.db_sg, ec2.Port.tcp(POSTGRES_PORT), "PostgreSQL")
            sg.connections.allow_to(self.redis_sg, ec2.Port.tcp(REDIS_PORT), "Redis")
        # the API and the ws function call hosts; hosts forward WebSocket messages to each other; the NLB delivers
        # the `$default` route. Every host route but /health requires the host secret header as well.
        self.functions_sg.connections.allow_to(self.hosts_sg, ec2.Port.tcp(HOST_PORT), "host API")
        self.hosts_sg.connections.allow_from(self.hosts_sg, ec2.Port.tcp(HOST_PORT), "host to host forwarding")
        self.nlb_sg.connections.allow_to(self.hosts_sg, ec2.Port.tcp(HOST_PORT), "NLB to hosts")


class Secrets(Construct):
    """Generated secrets, never in a template or an environment variable: the functions and the hosts fetch them
    from Secrets Manager at first use (tmuxi.secrets) by the ids their settings name."""

    def __init__(self, scope: Construct, cid: str) -> None:
        super().__init__(scope, cid)

        def generated(name: str, key: str, description: str) -> sm.Secret:
            secret = sm.Secret(self, name, description=description, generate_secret_string=sm.SecretStringGenerator(
                secret_string_template="{}", generate_string_key=key, password_length=64,  # noqa: S106 - a template
                exclude_punctuation=True))
            NagSuppressions.add_resource_suppressions(secret, [{
                "id": "AwsSolutions-SMG4",
                "reason": f"{key} is a random key with no service to rotate it against; rotating it means a "
                          "deploy that changes it (README, 'Secrets'), which ends tokens or host calls in flight."}])
            return secret

        # The JWT signing key: functions only. The hosts never hold it (a compromised host cannot mint tokens).
        self.jwt = generated("JwtSecret", "jwt_secret", "HS256 key signing the API's tokens")
        # Functions and hosts authenticate each other's internal calls with it.
        self.host = generated("HostSecret", "host_secret", "shared secret of the tmux hosts' internal API")
        # ElastiCache AUTH token (no punctuation: ElastiCache refuses some of it)
        self.redis = generated("RedisAuth", "auth_token", "ElastiCache Redis AUTH token")
        # Where the alerts function posts incident messages: the operator puts {"url": "https://hooks..."} in it
        # (a webhook URL is a credential). Until then incidents are recorded and each message is logged as not sent.
        self.alert_webhook = sm.Secret(self, "AlertWebhook", description="incident webhook: JSON {\"url\": ...}",
                                       secret_object_value={})
        NagSuppressions.add_resource_suppressions(self.alert_webhook, [{
            "id": "AwsSolutions-SMG4", "reason": "a third party's webhook URL: it is replaced by the operator when "
                                                 "the receiving side issues a new one, not rotated by AWS"}])


class Database(Construct):
    """PostgreSQL: encrypted, TLS only, backups kept per environment, deletion protection outside dev, and the
    credentials in Secrets Manager, rotated on a schedule (single user: a pool that fails authentication fetches
    the secret again, tmuxi.secrets)."""

    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig, network: Network) -> None:
        super().__init__(scope, cid)
        params = rds.ParameterGroup(self, "Params", engine=_engine(), parameters={
            "rds.force_ssl": "1", "log_min_duration_statement": "1000"})
        self.instance = rds.DatabaseInstance(
            self, "Postgres", engine=_engine(), database_name=DB_NAME,
            instance_type=ec2.InstanceType(config.db_instance_type),
            # characters that would need escaping in a connection URL are left out of the generated password
            credentials=rds.Credentials.from_generated_secret(DB_USER, exclude_characters=URL_UNSAFE),
            vpc=network.vpc, vpc_subnets=network.isolated, security_groups=[network.db_sg],
            allocated_storage=config.db_allocated_storage_gb, max_allocated_storage=config.db_max_allocated_storage_gb,
            storage_encrypted=True, multi_az=config.db_multi_az, publicly_accessible=False,
            backup_retention=Duration.days(config.db_backup_retention_days),
            deletion_protection=config.db_deletion_protection, parameter_group=params,
            cloudwatch_logs_exports=["postgresql"], cloudwatch_logs_retention=retention(config.log_retention_days),
            auto_minor_version_upgrade=True, copy_tags_to_snapshot=True,
            enable_performance_insights=not config.db_instance_type.startswith("t4g.micro"),
            removal_policy=RemovalPolicy.SNAPSHOT if config.retain else RemovalPolicy.DESTROY,
        )
        assert self.instance.secret is not None
        self.secret = self.instance.secret
        self.rotation = self.instance.add_rotation_single_user(
            automatically_after=Duration.days(config.db_secret_rotation_days), vpc_subnets=network.private)
        NagSuppressions.add_resource_suppressions(self.instance, [
            {"id": "AwsSolutions-RDS11", "reason": "the default port: it is reachable only from two security "
                                                   "groups in private subnets; a custom port adds nothing"},
            {"id": "AwsSolutions-IAM4", "reason": "RDS's enhanced-monitoring managed role (none is created "
                                                  "unless monitoring_interval is set)"},
        ])
        if not config.db_multi_az:
            NagSuppressions.add_resource_suppressions(self.instance, [{
                "id": "AwsSolutions-RDS3",
                "reason": f"{config.name}: a single AZ by configuration (db_multi_az, cdk.json); prod is multi-AZ"}])
        if not config.db_deletion_protection:
            NagSuppressions.add_resource_suppressions(self.instance, [{
                "id": "AwsSolutions-RDS10",
                "reason": f"{config.name}: a throw-away environment (db_deletion_protection false in cdk.json)"}])


class Cache(Construct):
    """Redis: AUTH and TLS in transit, encrypted at rest, in the isolated subnets, reachable from two groups."""

    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig, network: Network, auth: sm.Secret) -> None:
        super().__init__(scope, cid)
        subnets = elasticache.CfnSubnetGroup(
            self, "Subnets", description="tmuxi Redis",
            subnet_ids=network.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED).subnet_ids)
        failover = config.redis_replicas >= 1
        self.group = elasticache.CfnReplicationGroup(
            self, "Redis", replication_group_description="tmuxi hot state: cache, revocations, rate limits",
            engine="redis", engine_version="7.1", cache_node_type=config.redis_node_type,
            num_node_groups=1, replicas_per_node_group=config.redis_replicas,
            automatic_failover_enabled=failover, multi_az_enabled=failover,
            transit_encryption_enabled=True, at_rest_encryption_enabled=True,
            # resolved by CloudFormation at deploy time: the token is never in the template
            auth_token=SecretValue.secrets_manager(auth.secret_arn, json_field="auth_token").unsafe_unwrap(),
            cache_subnet_group_name=subnets.ref, security_group_ids=[network.redis_sg.security_group_id],
            snapshot_retention_limit=1 if config.name == "dev" else 7, port=REDIS_PORT,
        )
        if not failover:
            NagSuppressions.add_resource_suppressions(self.group, [{
                "id": "AwsSolutions-AEC4",
                "reason": f"{config.name}: one node by configuration (redis_replicas 0); Redis is not on the "
                          "critical path (the API keeps working without it, ARCHITECTURE.md)"}])
        NagSuppressions.add_resource_suppressions(self.group, [{
            "id": "AwsSolutions-AEC5", "reason": "the default port, reachable only from two security groups"}])

    @property
    def url(self) -> str:
        """``rediss://<primary>:<port>/0``: no password in it; the AUTH token comes from its secret."""
        return f"rediss://{self.group.attr_primary_end_point_address}:{self.group.attr_primary_end_point_port}/0"


class Buckets(Construct):
    """Recordings and backups: encrypted, TLS only, no public access, versioned backups, lifecycle rules, and
    server access logs."""

    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig) -> None:
        super().__init__(scope, cid)
        removal = RemovalPolicy.RETAIN if config.retain else RemovalPolicy.DESTROY
        auto_delete = not config.retain

        def bucket(name: str, **kw: object) -> s3.Bucket:
            return s3.Bucket(self, name, encryption=s3.BucketEncryption.S3_MANAGED, enforce_ssl=True,
                             block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
                             object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
                             removal_policy=removal, auto_delete_objects=auto_delete, **kw)  # type: ignore[arg-type]

        self.access_logs = bucket("AccessLogs",
                                  lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(90))])
        NagSuppressions.add_resource_suppressions(self.access_logs, [{
            "id": "AwsSolutions-S1", "reason": "the server access log bucket itself"}])
        transitions = []
        if config.recordings_infrequent_access_days:
            transitions.append(s3.Transition(storage_class=s3.StorageClass.INFREQUENT_ACCESS,
                                             transition_after=Duration.days(config.recordings_infrequent_access_days)))
        self.recordings = bucket(
            "Recordings", server_access_logs_bucket=self.access_logs, server_access_logs_prefix="recordings/",
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(config.recordings_expire_days),
                                              transitions=transitions or None,
                                              abort_incomplete_multipart_upload_after=Duration.days(1))])
        self.backups = bucket(
            "Backups", versioned=True, server_access_logs_bucket=self.access_logs, server_access_logs_prefix="backups/",
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(config.backups_expire_days),
                                              noncurrent_version_expiration=Duration.days(7),
                                              abort_incomplete_multipart_upload_after=Duration.days(1))])


def alarm_key(scope: Construct) -> kms.Key:
    """A customer managed key for the alarm topic (CloudWatch cannot publish to a topic under the AWS managed
    SNS key)."""
    return kms.Key(scope, "AlarmTopicKey", enable_key_rotation=True, description="tmuxi alarm topic")


def _engine() -> rds.IInstanceEngine:
    return rds.DatabaseInstanceEngine.postgres(version=rds.PostgresEngineVersion.VER_18)


_RETENTION = {1: "ONE_DAY", 3: "THREE_DAYS", 5: "FIVE_DAYS", 7: "ONE_WEEK", 14: "TWO_WEEKS", 30: "ONE_MONTH",
              60: "TWO_MONTHS", 90: "THREE_MONTHS", 120: "FOUR_MONTHS", 150: "FIVE_MONTHS", 180: "SIX_MONTHS",
              365: "ONE_YEAR", 400: "THIRTEEN_MONTHS", 545: "EIGHTEEN_MONTHS", 731: "TWO_YEARS", 1827: "FIVE_YEARS",
              3653: "TEN_YEARS"}


def retention(days: int) -> logs.RetentionDays:
    """The CloudWatch Logs retention for a number of days (it offers only certain values)."""
    if days not in _RETENTION:
        raise ValueError(f"log retention of {days} days is not one CloudWatch Logs offers ({sorted(_RETENTION)}): "
                         "fix log_retention_days in cdk.json")
    return getattr(logs.RetentionDays, _RETENTION[days])  # type: ignore[no-any-return]

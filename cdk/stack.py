"""One environment of the system: the stack composes the constructs per concern and wires them together (who may
reach what, which settings each deployable gets, which secrets each role may read)."""
from __future__ import annotations

from aws_cdk import CfnOutput, Duration, Stack, Tags, triggers
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from cdk_nag import NagSuppressions
from constructs import Construct

from cdk.api import RestApi, WebSocketApi
from cdk.config import EnvConfig
from cdk.data import Buckets, Cache, Database, Network, Secrets, alarm_key
from cdk.functions import Functions, settings_env
from cdk.host import Host
from cdk.monitoring import Monitoring
from cdk.names import HOST_DATA_DIR, HOST_PORT


class TmuxiStack(Stack):
    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig, **kwargs: object) -> None:
        super().__init__(scope, cid, **kwargs)  # type: ignore[arg-type]
        Tags.of(self).add("service", "tmuxi")
        Tags.of(self).add("environment", config.name)
        self.config = config
        self.network = Network(self, "Network", config=config)
        self.secrets = Secrets(self, "Secrets")
        self.database = Database(self, "Database", config=config, network=self.network)
        self.cache = Cache(self, "Cache", config=config, network=self.network, auth=self.secrets.redis)
        self.buckets = Buckets(self, "Buckets", config=config)

        # Settings every deployable shares (tmuxi.settings fields; secrets by id only)
        common = {
            "environment": config.settings_environment,
            "isolation": "required",
            "database_secret_id": self.database.secret.secret_arn,
            "redis_url": self.cache.url,
            "redis_secret_id": self.secrets.redis.secret_arn,
            "host_secret_id": self.secrets.host.secret_arn,
            "jwt_secret_id": self.secrets.jwt.secret_arn,  # an id: the hosts' role cannot read it
            "recordings_url": f"s3://{self.buckets.recordings.bucket_name}/recordings",
            "aws_region": self.region,
            "host_timeout_s": 5,
        }
        self.host = Host(self, "Host", config=config, network=self.network, environment={})
        self.functions = Functions(self, "Functions", config=config, network=self.network, environment={})
        fns, aliases = self.functions.functions, self.functions.aliases

        self.rest = RestApi(self, "Api", config=config, api=aliases["api"], authorizer=aliases["authorizer"],
                            mcp=aliases["mcp"])
        self.ws = WebSocketApi(self, "WebSocket", config=config, ws=aliases["ws"], host=self.host,
                               host_secret=self.secrets.host)
        live = {"ws_management_endpoint": self.ws.management_endpoint}
        for name, fn in fns.items():
            values: dict[str, str | int | float | None] = {**common, **live}
            if name == "api":
                values["rate_limit_processes"] = config.api_reserved_concurrency
            if name == "alerts":
                values["alert_webhook_secret_id"] = self.secrets.alert_webhook.secret_arn
            if name == "mcp":  # its tools call the REST API with the caller's token
                values["api_url"] = self.rest.base_url
            if name == "maintenance":
                values["backups_url"] = f"s3://{self.buckets.backups.bucket_name}/backups"
            if name == "maintenance":  # its `backup` task (services/backup.py)
                values["backups_url"] = f"s3://{self.buckets.backups.bucket_name}/backups"
            for key, value in settings_env(values).items():
                fn.add_environment(key, value)
        host_env = settings_env({
            **common, **live, "host_bind": "0.0.0.0", "host_port": HOST_PORT,  # noqa: S104 - in its own task
            "host_capacity": config.host_capacity, "drain_timeout_s": config.host_drain_timeout_s,
            "data_dir": HOST_DATA_DIR, "db_pool_max": 10})
        for key, value in host_env.items():
            self.host.container.add_environment(key, value)

        # Who may read which secret (every deployable gets every id, which is no secret; IAM decides what it can
        # read). Redis cache entries are signed with a key derived from the JWT key (tmuxi/cache.py), so every
        # function that uses Redis reads it; the hosts only delete cache entries and never hold it.
        db, redis_auth, host, jwt = (self.database.secret, self.secrets.redis, self.secrets.host, self.secrets.jwt)
        readable = {
            "api": (db, redis_auth, host, jwt),
            "authorizer": (db, redis_auth, jwt),
            "ws": (db, redis_auth, host, jwt),
            "maintenance": (db, redis_auth, host, jwt),
            "alerts": (db, self.secrets.alert_webhook),
            "migrate": (db,),
        }
        for name, secrets in readable.items():
            for secret in secrets:
                secret.grant_read(self.functions.roles[name])
        host_role = self.host.task_definition.task_role
        for secret in (self.database.secret, self.secrets.redis, self.secrets.host):
            secret.grant_read(host_role)
        # Recordings: the hosts write them, the API lists and reads them; backups: the maintenance function.
        # Output reaches clients through the WebSocket API's @connections.
        self._objects(host_role, self.buckets.recordings, ["s3:PutObject", "s3:GetObject"])
        self._objects(self.functions.roles["api"], self.buckets.recordings, ["s3:GetObject"])
        self._objects(self.functions.roles["maintenance"], self.buckets.backups, ["s3:PutObject", "s3:GetObject"])
        for grantee in (host_role, self.functions.roles["api"], self.functions.roles["ws"]):
            self.ws.grant_manage_connections(grantee)
            NagSuppressions.add_resource_suppressions(grantee, [{
                "id": "AwsSolutions-IAM5", "reason": "execute-api:ManageConnections on this API's connections: "
                                                    "connection ids exist only at run time",
                "appliesTo": [{"regex": "/^Resource::arn:<AWS::Partition>:execute-api:.*@connections/\\*$/g"}]}],
                apply_to_children=True)
        # RDS's log export retention is applied by CDK's own singleton function (AWS managed policy, "*")
        NagSuppressions.add_resource_suppressions_by_path(
            self, f"/{self.stack_name}/LogRetentionaae0aa3c5b4d4f87b02d85b201efdd8a/ServiceRole", [
                {"id": "AwsSolutions-IAM4", "reason": "CDK's log-retention function for the RDS log export; "
                                                      "AWSLambdaBasicExecutionRole is what CDK gives it"},
                {"id": "AwsSolutions-IAM5", "reason": "CDK's log-retention function sets retention on log "
                                                      "groups RDS creates, whose names are known only then"}],
            apply_to_children=True)

        # Migrations are a deployment step: the migrate function runs (after the database, before the new code
        # serves) whenever it or the layer changes; a failure fails the deploy (and rolls it back).
        self.migrate = triggers.Trigger(
            self, "Migrate", handler=fns["migrate"], timeout=Duration.minutes(5),
            execute_after=[self.database.instance], execute_on_handler_change=True,
            execute_before=[aliases["api"], aliases["authorizer"], aliases["ws"], self.host.service])

        self.monitoring = Monitoring(
            self, "Monitoring", config=config, key=alarm_key(self), alerts=fns["alerts"],
            maintenance=fns["maintenance"],
            functions={n: f for n, f in fns.items()}, rest=self.rest.api, host=self.host,
            database=self.database, cache=self.cache)

        self._outputs()

    def _outputs(self) -> None:
        CfnOutput(self, "RestApiUrl", value=self.rest.url)
        CfnOutput(self, "WebSocketUrl", value=self.ws.stage.url)
        CfnOutput(self, "RecordingsBucket", value=self.buckets.recordings.bucket_name)
        CfnOutput(self, "BackupsBucket", value=self.buckets.backups.bucket_name)
        CfnOutput(self, "Dashboard", value=self.monitoring.dashboard.dashboard_name)
        NagSuppressions.add_stack_suppressions(self, [
            {"id": "AwsSolutions-L1", "reason": "the Lambda functions CDK itself adds (bucket auto-delete, trigger "
                                                "and rotation providers) run the runtime CDK pins; ours run "
                                                "python3.12 (cdk/functions.py: SnapStart)"},
        ])

    @staticmethod
    def _objects(role: iam.IRole, bucket: s3.IBucket, actions: list[str]) -> None:
        """``actions`` on the bucket's objects and ListBucket on the bucket: nothing else of S3."""
        role.add_to_principal_policy(iam.PolicyStatement(actions=actions, resources=[bucket.arn_for_objects("*")]))
        role.add_to_principal_policy(iam.PolicyStatement(actions=["s3:ListBucket"], resources=[bucket.bucket_arn]))
        NagSuppressions.add_resource_suppressions(role, [{
            "id": "AwsSolutions-IAM5", "reason": "objects of this one bucket: keys are per session and per run",
            "appliesTo": [{"regex": "/^Resource::<Buckets.*\\.Arn>\\/\\*$/g"}]}], apply_to_children=True)

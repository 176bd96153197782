"""The Lambda layer and the functions: one least-privilege role each, Python 3.12 on arm64, SnapStart on the
functions in the request path (API Gateway invokes their ``live`` alias, a published version).

Packages are built without Docker by ``layers/build.py`` (manylinux wheels for arm64 from the lock), as CDK local
bundling: ``cdk synth`` builds them, and their asset hash is the hash of what was built.
"""
from __future__ import annotations

from typing import Any

import jsii
from aws_cdk import AssetHashType, BundlingOptions, DockerImage, Duration, ILocalBundling, RemovalPolicy, Size
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from cdk_nag import NagSuppressions
from constructs import Construct

from cdk.config import EnvConfig
from cdk.data import Network, retention
from cdk.names import ALIAS, FUNCTIONS, ROOT, SNAPSTART_FUNCTIONS, handler
from layers.build import OWN_LAYERS
from tmuxi.settings import env_name

RUNTIME = lambda_.Runtime.PYTHON_3_12  # SnapStart for Python needs 3.12+; the closest to the 3.11 the tests run on
ARCHITECTURE = lambda_.Architecture.ARM_64  # Graviton: ~20% cheaper per GB-second; every wheel we use has arm64
TIMEOUTS_S = {"api": 29, "authorizer": 10, "ws": 29, "maintenance": 300, "alerts": 60, "migrate": 300, "mcp": 29}


@jsii.implements(ILocalBundling)
class _LocalBuild:
    """Builds a package on this machine (no Docker) with layers/build.py."""

    def __init__(self, kind: str, name: str | None = None) -> None:
        self.kind, self.name = kind, name

    def try_bundle(self, output_dir: str, *_options: Any, **_kw: Any) -> bool:  # (the options are Docker's)
        from pathlib import Path

        from layers.build import build  # the build tool, not part of the deployed code

        build(self.kind, Path(output_dir), name=self.name)
        return True


def _code(kind: str, source: str, name: str | None = None) -> lambda_.Code:
    # A function's own layer is built from the same source directory as the core layer (and from its lock, outside
    # it): hashed by what was built, or the two would share one hash, and one asset.
    own_layer = kind == "layer" and name is not None
    return lambda_.Code.from_asset(
        str(ROOT / source),
        bundling=BundlingOptions(image=DockerImage.from_registry("none:local-bundling-only"),
                                 local=_LocalBuild(kind, name)),
        asset_hash_type=AssetHashType.OUTPUT if own_layer else None,
        exclude=["__pycache__", "*.pyc"])


def settings_env(values: dict[str, str | int | float | None]) -> dict[str, str]:
    """Environment variables from settings fields: ``{"redis_url": ...}`` -> ``{"TMUXI_REDIS_URL": ...}``. An
    unknown field fails synthesis (the names come from the settings model, never typed twice)."""
    return {env_name(field): str(value) for field, value in values.items() if value is not None}


class Functions(Construct):
    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig, network: Network,
                 environment: dict[str, str]) -> None:
        super().__init__(scope, cid)
        self.layer = lambda_.LayerVersion(
            self, "Core", code=_code("layer", "layers"), compatible_runtimes=[RUNTIME],
            compatible_architectures=[ARCHITECTURE],
            description="tmuxi core package (layers/tmuxi) and its locked dependencies",
            removal_policy=RemovalPolicy.RETAIN)
        # a function with dependencies no other one needs has a layer of its own instead (layers/build.py OWN_LAYERS)
        self.own_layers = {name: lambda_.LayerVersion(
            self, f"{name}Layer", code=_code("layer", "layers", name), compatible_runtimes=[RUNTIME],
            compatible_architectures=[ARCHITECTURE],
            description=f"tmuxi core package and the {name} function's locked dependencies",
            removal_policy=RemovalPolicy.RETAIN) for name in OWN_LAYERS}
        self.functions: dict[str, lambda_.Function] = {}
        self.aliases: dict[str, lambda_.Alias] = {}
        self.roles: dict[str, iam.Role] = {}
        for name in FUNCTIONS:
            self._function(name, config, network, environment)

    def _function(self, name: str, config: EnvConfig, network: Network, environment: dict[str, str]) -> None:
        log_group = logs.LogGroup(self, f"{name}Logs", retention=retention(config.log_retention_days),
                                  removal_policy=RemovalPolicy.DESTROY)
        role = iam.Role(self, f"{name}Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                        description=f"tmuxi {name} function (its own role: least privilege)")
        # What AWSLambdaBasicExecutionRole + AWSLambdaVPCAccessExecutionRole grant, scoped where AWS allows it.
        log_group.grant_write(role)
        role.add_to_policy(iam.PolicyStatement(
            actions=["ec2:CreateNetworkInterface", "ec2:DescribeNetworkInterfaces", "ec2:DeleteNetworkInterface",
                     "ec2:AssignPrivateIpAddresses", "ec2:UnassignPrivateIpAddresses"], resources=["*"]))
        NagSuppressions.add_resource_suppressions(role, [{
            "id": "AwsSolutions-IAM5",
            "reason": "ENI management for a function in a VPC (what AWSLambdaVPCAccessExecutionRole grants) and X-Ray "
                      "segments: neither action supports resource-level permissions. Every other statement names "
                      "its resources.",
            "appliesTo": ["Resource::*"]}], apply_to_children=True)
        snapstart = name in SNAPSTART_FUNCTIONS
        fn = lambda_.Function(
            self, f"{name}Function", runtime=RUNTIME, architecture=ARCHITECTURE, handler=handler(name),
            code=_code("function", f"functions/{name}", name), layers=[self.own_layers.get(name, self.layer)],
            role=role,
            memory_size=config.api_memory_mb if name == "api" else config.function_memory_mb,
            timeout=Duration.seconds(TIMEOUTS_S[name]), log_group=log_group,
            environment={**environment, "POWERTOOLS_SERVICE_NAME": f"tmuxi-{name}"},
            vpc=network.vpc, vpc_subnets=network.private, security_groups=[network.functions_sg],
            tracing=lambda_.Tracing.ACTIVE,
            snap_start=lambda_.SnapStartConf.ON_PUBLISHED_VERSIONS if snapstart else None,
            reserved_concurrent_executions=config.api_reserved_concurrency if name == "api" else None,
            # the backup task spools each table's export in /tmp before uploading it
            ephemeral_storage_size=Size.gibibytes(4) if name == "maintenance" else None,
            description=f"tmuxi {name}")
        self.functions[name] = fn
        self.roles[name] = role
        if snapstart:  # API Gateway invokes the alias: a published version (SnapStart restores only those)
            self.aliases[name] = lambda_.Alias(self, f"{name}Alias", alias_name=ALIAS, version=fn.current_version)

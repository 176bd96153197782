"""The CDK app, checked offline: every environment synthesises with no AWS credentials, the properties that matter
hold in the templates, cdk-nag's AwsSolutions pack finds no unsuppressed error, and cfn-lint no error.

Synthesis runs once per test session, the way the CDK CLI runs the app (``python -m cdk.app`` with CDK_OUTDIR and
CDK_CONTEXT_JSON), in an environment with no AWS credentials and an empty HOME. Bundling (building the Lambda
packages with pip) is skipped here, as ``cdk synth --exclusively``-style runs do; tests/infrastructure/
test_packaging.py builds the packages themselves.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdk.config import CONTEXT_KEY, EnvConfig, load
from cdk.host import DOCKER_DEFAULT_CAPABILITIES, STOP_MARGIN_S
from cdk.monitoring import RULES
from cdk.names import FUNCTIONS, SNAPSTART_FUNCTIONS
from layers.build import OWN_LAYERS, function_names
from tmux_host.accounts import HOST_CAPABILITIES
from tmuxi.routes import GATEWAY_RESPONSES, ROUTES, WS_CONNECTION_HEADER, WS_ROUTES
from tmuxi.schedules import SCHEDULES
from tmuxi.settings import ENV_PREFIX, Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = json.loads((ROOT / "cdk.json").read_text())["context"]
CONFIGS = load(CONTEXT[CONTEXT_KEY])
Template = dict[str, Any]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def assembly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("cdk.out")
    home = tmp_path_factory.mktemp("home")  # no ~/.aws
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CDK_", "TMUXI_"))}
    env.update(HOME=str(home), CDK_OUTDIR=str(out), JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION="1",
               AWS_CONFIG_FILE=str(home / "none"), AWS_SHARED_CREDENTIALS_FILE=str(home / "none"),
               CDK_CONTEXT_JSON=json.dumps({**CONTEXT, "aws:cdk:bundling-stacks": []}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cdk.app"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"cdk synth failed ({time.perf_counter() - t0:.1f} s):\n{proc.stderr[-6000:]}"
    yield out


def template(out: Path, env: str) -> Template:
    return json.loads((out / f"tmuxi-{env}.template.json").read_text())  # type: ignore[no-any-return]


def resources(t: Template, kind: str) -> dict[str, dict[str, Any]]:
    return {k: r.get("Properties", {}) for k, r in t["Resources"].items() if r["Type"] == kind}


def one(t: Template, kind: str) -> dict[str, Any]:
    found = resources(t, kind)
    assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
    return next(iter(found.values()))


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


@pytest.fixture(params=list(CONFIGS), scope="session")
def env(request: pytest.FixtureRequest, assembly: Path) -> tuple[EnvConfig, Template]:
    return CONFIGS[request.param], template(assembly, request.param)


# --- synthesis, cdk-nag, cfn-lint ----------------------------------------------------------------------------


def test_every_environment_synthesises_without_credentials_and_nag_errors(assembly: Path) -> None:
    manifest = json.loads((assembly / "manifest.json").read_text())
    stacks = {k for k, v in manifest["artifacts"].items() if v["type"] == "aws:cloudformation:stack"}
    assert stacks == {f"tmuxi-{e}" for e in ("dev", "staging", "prod")}
    errors = [entry for art in manifest["artifacts"].values() for entries in art.get("metadata", {}).values()
              for entry in entries if entry["type"] == "aws:cdk:error"]
    assert errors == [], errors  # cdk-nag's AwsSolutions pack (unsuppressed findings are errors)
    # every suppression carries its reason (cdk-nag refuses short ones; here: a sentence)
    for name in stacks:
        for r in template(assembly, name.removeprefix("tmuxi-"))["Resources"].values():
            for s in r.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", []):
                assert len(s["reason"]) >= 30, s


def test_cfn_lint_finds_no_error_in_any_template(assembly: Path) -> None:
    templates = sorted(str(p) for p in assembly.glob("tmuxi-*.template.json"))
    assert len(templates) == 3
    proc = subprocess.run([str(Path(sys.executable).parent / "cfn-lint"), "--format", "parseable", *templates],
                          capture_output=True, text=True, timeout=600)
    findings = [line for line in proc.stdout.splitlines() if line.strip()]
    errors = [f for f in findings if re.search(r":E\d{4}:", f)]
    assert errors == [], "\n".join(errors)


# --- data stores ---------------------------------------------------------------------------------------------


def test_postgres_is_encrypted_private_backed_up_and_protected_outside_dev(env: tuple[EnvConfig, Template]) -> None:
    config, t = env
    db = one(t, "AWS::RDS::DBInstance")
    assert db["StorageEncrypted"] is True
    assert db["PubliclyAccessible"] is False
    assert db["BackupRetentionPeriod"] == config.db_backup_retention_days
    assert db["DeletionProtection"] is config.db_deletion_protection
    assert db["DeletionProtection"] is (config.name != "dev")
    assert db["MultiAZ"] is config.db_multi_az
    assert "SecretString" not in dumps(db) or "{{resolve:secretsmanager:" in dumps(db["MasterUserPassword"])
    params = one(t, "AWS::RDS::DBParameterGroup")
    assert params["Parameters"]["rds.force_ssl"] == "1"
    rotation = one(t, "AWS::SecretsManager::RotationSchedule")
    assert rotation["RotationRules"]["ScheduleExpression"] == f"rate({config.db_secret_rotation_days} days)"


def test_redis_requires_auth_and_tls_and_is_encrypted(env: tuple[EnvConfig, Template]) -> None:
    _, t = env
    redis = one(t, "AWS::ElastiCache::ReplicationGroup")
    assert redis["TransitEncryptionEnabled"] is True
    assert redis["AtRestEncryptionEnabled"] is True
    # the AUTH token is a dynamic reference CloudFormation resolves at deploy time, never a value in the template
    assert "{{resolve:secretsmanager:" in dumps(redis["AuthToken"])


def test_buckets_are_encrypted_tls_only_private_with_lifecycle_rules(env: tuple[EnvConfig, Template]) -> None:
    config, t = env
    buckets = resources(t, "AWS::S3::Bucket")
    assert len(buckets) == 3  # recordings, backups, their access logs
    policies = {dumps(p["Bucket"]): p for p in resources(t, "AWS::S3::BucketPolicy").values()}
    for lid, b in buckets.items():
        assert b["BucketEncryption"]["ServerSideEncryptionConfiguration"], lid
        assert b["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True}, lid
        policy = policies[dumps({"Ref": lid})]["PolicyDocument"]["Statement"]
        assert any(s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
                   for s in policy), lid
        assert b["LifecycleConfiguration"]["Rules"], lid
    expirations = sorted(r.get("ExpirationInDays") for b in buckets.values()
                         for r in b["LifecycleConfiguration"]["Rules"])
    assert config.recordings_expire_days in expirations and config.backups_expire_days in expirations
    assert sum(1 for b in buckets.values() if b.get("VersioningConfiguration", {}).get("Status") == "Enabled") == 1


def test_each_data_store_is_reachable_only_by_what_needs_it(env: tuple[EnvConfig, Template]) -> None:
    _, t = env
    groups = resources(t, "AWS::EC2::SecurityGroup")
    by_name = {g["GroupDescription"].split(":")[0]: lid for lid, g in groups.items()}
    ingress = resources(t, "AWS::EC2::SecurityGroupIngress")
    for g in groups.values():  # no inline rule lets the internet in
        for rule in g.get("SecurityGroupIngress", []):
            assert rule.get("CidrIp") != "0.0.0.0/0" and rule.get("CidrIpv6") != "::/0", rule

    def sources(target: str, port: int) -> set[str]:
        lid = by_name[target]
        return {r["SourceSecurityGroupId"]["Fn::GetAtt"][0] for r in ingress.values()
                if r["GroupId"] == {"Fn::GetAtt": [lid, "GroupId"]} and r["FromPort"] == port}

    allowed = {by_name["Lambda functions"], by_name["tmux hosts (ECS tasks)"]}
    rotation = {lid for lid, g in groups.items() if "Rotation" in lid or "rotation" in g["GroupDescription"]}
    assert sources("PostgreSQL", 5432) - rotation == allowed
    assert sources("Redis", 6379) == allowed
    for rule in ingress.values():
        assert "CidrIp" not in rule, rule
    # nothing can reach the NLB's group but the VPC link (no inbound rule at all)
    nlb = by_name["the internal NLB of the hosts (WebSocket default route via the VPC link)"]
    assert not [r for r in ingress.values() if r["GroupId"] == {"Fn::GetAtt": [nlb, "GroupId"]}]


# --- the tmux host -------------------------------------------------------------------------------------------


def test_host_task_is_unprivileged_with_only_the_capabilities_isolation_needs(env: tuple[EnvConfig, Template]) -> None:
    config, t = env
    task = one(t, "AWS::ECS::TaskDefinition")
    (container,) = task["ContainerDefinitions"]
    assert container.get("Privileged") in (None, False)
    linux = container["LinuxParameters"]
    assert linux["InitProcessEnabled"] is True
    assert "Add" not in linux["Capabilities"]  # Fargate may add only SYS_PTRACE; the host needs none added
    kept = DOCKER_DEFAULT_CAPABILITIES - set(linux["Capabilities"]["Drop"])
    # exactly what the host keeps of root (tmux_host/accounts.py), but for DAC_READ_SEARCH (a local PostgreSQL
    # socket only; not in Docker's defaults)
    assert {c.lower() for c in kept} == set(HOST_CAPABILITIES) - {"dac_read_search"}
    assert container["StopTimeout"] == config.host_drain_timeout_s + STOP_MARGIN_S <= 120
    assert container["HealthCheck"]["Command"][0] == "CMD"
    assert task["RuntimePlatform"]["CpuArchitecture"] == "ARM64"
    assert task["RequiresCompatibilities"] == ["FARGATE"]
    env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env_vars[env_name("isolation")] == "required"
    assert str(config.host_drain_timeout_s) == env_vars[env_name("drain_timeout_s")].split(".")[0]


def test_host_service_deploys_new_tasks_before_stopping_old_and_scales_on_sessions_and_cpu(
        env: tuple[EnvConfig, Template]) -> None:
    config, t = env
    service = one(t, "AWS::ECS::Service")
    deploy = service["DeploymentConfiguration"]
    assert deploy["MinimumHealthyPercent"] == 100 and deploy["MaximumPercent"] == 200
    assert deploy["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    target = one(t, "AWS::ApplicationAutoScaling::ScalableTarget")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (config.host_min_tasks, config.host_max_tasks)
    policies = resources(t, "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    tracked = {dumps(p["TargetTrackingScalingPolicyConfiguration"].get("CustomizedMetricSpecification", {})
                     .get("MetricName", "cpu")): p["TargetTrackingScalingPolicyConfiguration"]["TargetValue"]
               for p in policies}
    assert tracked == {'"tmux_active_sessions"': config.host_sessions_target, '"cpu"': config.host_cpu_target_percent}
    # the task may protect itself (scale-in protection), and only tasks of its cluster
    statements = [s for p in resources(t, "AWS::IAM::Policy").values() for s in p["PolicyDocument"]["Statement"]]
    protect = [s for s in statements if "ecs:UpdateTaskProtection" in s["Action"]]
    assert len(protect) == 1 and ":task/" in dumps(protect[0]["Resource"])


# --- APIs ------------------------------------------------------------------------------------------------------


def test_rest_api_has_every_route_with_the_authorizer_on_protected_ones(env: tuple[EnvConfig, Template]) -> None:
    config, t = env
    methods = resources(t, "AWS::ApiGateway::Method")
    by_operation = {m["OperationName"]: m for m in methods.values() if "OperationName" in m}
    assert set(by_operation) == {r.name for r in ROUTES}
    aliases = {name: lid for lid, a in resources(t, "AWS::Lambda::Alias").items() for name in ("api", "mcp")
               if f"Functions{name}Function" in dumps(a["FunctionName"])}
    for route in ROUTES:
        m = by_operation[route.name]
        assert m["HttpMethod"] == route.method
        assert m["AuthorizationType"] == ("CUSTOM" if route.protected else "NONE"), route
        assert m["Integration"]["Type"] == "AWS_PROXY"
        # API Gateway invokes the alias (a published version: SnapStart) of the route's function
        assert ":live/invocations" in dumps(m["Integration"]["Uri"]) or "Alias" in dumps(m["Integration"]["Uri"])
        assert aliases[route.function] in dumps(m["Integration"]["Uri"]), route
    # the mcp function calls the stage's URL, built from the API's id (its URL attribute would be a cycle)
    (mcp,) = [f for f in _functions(t).values() if f["Handler"] == "functions.mcp.handler.handler"]
    api_url = dumps(mcp["Environment"]["Variables"][env_name("api_url")])
    (rest_id,) = resources(t, "AWS::ApiGateway::RestApi")
    assert f'"Ref": "{rest_id}"' in api_url and ".execute-api." in api_url and api_url.endswith('/v1"]]}')
    authorizer = one(t, "AWS::ApiGateway::Authorizer")
    assert authorizer["Type"] == "REQUEST" and authorizer["IdentitySource"] == "method.request.header.Authorization"
    responses = {r["ResponseType"]: r for r in resources(t, "AWS::ApiGateway::GatewayResponse").values()}
    assert set(responses) == set(GATEWAY_RESPONSES)
    assert responses["AUTHORIZER_FAILURE"]["StatusCode"] == "503"
    stage = one(t, "AWS::ApiGateway::Stage")
    (settings,) = stage["MethodSettings"]
    assert settings["ThrottlingRateLimit"] == config.throttle_rate_limit
    assert settings["ThrottlingBurstLimit"] == config.throttle_burst_limit
    assert "DestinationArn" in stage["AccessLogSetting"] and stage["TracingEnabled"] is True


def test_websocket_routes_and_default_route_to_the_hosts_over_the_vpc_link(env: tuple[EnvConfig, Template]) -> None:
    _, t = env
    api = one(t, "AWS::ApiGatewayV2::Api")
    assert api["ProtocolType"] == "WEBSOCKET" and api["RouteSelectionExpression"] == "$request.body.action"
    routes = {r["RouteKey"]: r for r in resources(t, "AWS::ApiGatewayV2::Route").values()}
    assert set(routes) == {r.key for r in WS_ROUTES}
    integrations = resources(t, "AWS::ApiGatewayV2::Integration")
    default_target = routes["$default"]["Target"]
    (hosts,) = [v for k, v in integrations.items() if k in dumps(default_target)]
    assert hosts["IntegrationType"] == "HTTP_PROXY" and hosts["ConnectionType"] == "VPC_LINK"
    params = hosts["RequestParameters"]
    assert params[f"integration.request.header.{WS_CONNECTION_HEADER}"] == "context.connectionId"
    secret = params["integration.request.header.X-Tmuxi-Host-Secret"]
    assert "{{resolve:secretsmanager:" in dumps(secret)  # resolved at deploy time, not in the template
    ws_alias = next(lid for lid, a in resources(t, "AWS::Lambda::Alias").items() if "ws" in dumps(a["FunctionName"]))
    for key in ("$connect", "$disconnect", "attach", "detach"):
        (target,) = [v for k, v in integrations.items() if k in dumps(routes[key]["Target"])]
        assert target["IntegrationType"] == "AWS_PROXY" and ws_alias in dumps(target["IntegrationUri"]), key
    responses = resources(t, "AWS::ApiGatewayV2::RouteResponse")
    assert len(responses) == 2  # attach and detach answer the client
    assert one(t, "AWS::ApiGateway::VpcLink")
    assert "AccessLogSettings" in one(t, "AWS::ApiGatewayV2::Stage")


# --- functions, roles, secrets --------------------------------------------------------------------------------


def _functions(t: Template) -> dict[str, dict[str, Any]]:
    return {lid: f for lid, f in resources(t, "AWS::Lambda::Function").items()
            if str(f.get("Handler", "")).startswith("functions.")}


def test_functions_run_python312_arm64_with_the_layer_and_snapstart_on_the_request_path(
        env: tuple[EnvConfig, Template]) -> None:
    _, t = env
    fns = _functions(t)
    handlers = {f["Handler"].split(".")[1]: f for f in fns.values()}
    assert set(handlers) == set(FUNCTIONS) == set(function_names())  # every functions/*/handler.py is deployed
    layers = resources(t, "AWS::Lambda::LayerVersion")
    assert len(layers) == 1 + len(OWN_LAYERS)
    (core,) = [lid for lid in layers if lid.startswith("FunctionsCore")]
    assert len({dumps(layer["Content"]) for layer in layers.values()}) == len(layers)  # each built on its own
    for name, f in handlers.items():
        assert f["Runtime"] == "python3.12" and f["Architectures"] == ["arm64"], name
        (layer,) = f["Layers"]
        if name in OWN_LAYERS:  # its own layer in place of the core one (layers/build.py)
            assert layer["Ref"] != core and layer["Ref"].startswith(f"Functions{name}Layer"), name
        else:
            assert layer == {"Ref": core}, name
        assert f["TracingConfig"] == {"Mode": "Active"}
        assert ("SnapStart" in f) is (name in SNAPSTART_FUNCTIONS), name
        if name in SNAPSTART_FUNCTIONS:
            assert f["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    assert len({dumps(f["Role"]) for f in fns.values()}) == len(fns)  # one role each


def test_no_secret_in_any_environment_and_every_name_comes_from_the_settings_model(
        env: tuple[EnvConfig, Template]) -> None:
    _, t = env
    known = {env_name(f) for f in Settings.model_fields}
    task = one(t, "AWS::ECS::TaskDefinition")
    envs = [f.get("Environment", {}).get("Variables", {}) for f in _functions(t).values()]
    envs.append({e["Name"]: e["Value"] for e in task["ContainerDefinitions"][0]["Environment"]})
    for variables in envs:
        ours = {k for k in variables if k.startswith(ENV_PREFIX)}
        assert ours <= known, ours - known
        for forbidden in ("jwt_secret", "host_secret", "database_url"):
            assert env_name(forbidden) not in variables
        assert env_name("database_secret_id") in variables
        assert "secretsmanager" not in dumps(variables).lower() or all(
            "resolve" not in str(v) for v in variables.values())
        assert "password" not in dumps(variables).lower()


def _policy_statements(t: Template, role_id: str) -> list[dict[str, Any]]:
    return [s for p in resources(t, "AWS::IAM::Policy").values() if {"Ref": role_id} in p["Roles"]
            for s in p["PolicyDocument"]["Statement"]]


def test_each_role_reads_only_the_secrets_it_needs_and_the_hosts_never_the_jwt_key(
        env: tuple[EnvConfig, Template]) -> None:
    _, t = env
    # (RDS's secret is granted through its target attachment)
    secrets = [*resources(t, "AWS::SecretsManager::Secret"),
               *resources(t, "AWS::SecretsManager::SecretTargetAttachment")]

    def secret_kind(lid: str) -> str:
        for kind in ("Jwt", "HostSecret", "RedisAuth", "AlertWebhook", "Postgres", "Database"):
            if kind in lid:
                return {"Postgres": "db", "Database": "db", "Jwt": "jwt", "HostSecret": "host",
                        "RedisAuth": "redis", "AlertWebhook": "webhook"}[kind]
        raise AssertionError(lid)

    expected = {"api": {"db", "redis", "host", "jwt"}, "authorizer": {"db", "redis", "jwt"},
                "ws": {"db", "redis", "host", "jwt"}, "maintenance": {"db", "redis", "host", "jwt"},
                "alerts": {"db", "webhook"}, "migrate": {"db"}, "host": {"db", "redis", "host"},
                "mcp": set()}  # it calls the REST API with its caller's token, and reads nothing else
    task = one(t, "AWS::ECS::TaskDefinition")
    roles = {f["Handler"].split(".")[1]: f["Role"]["Fn::GetAtt"][0] for f in _functions(t).values()}
    roles["host"] = task["TaskRoleArn"]["Fn::GetAtt"][0]
    for name, role_id in roles.items():
        statements = _policy_statements(t, role_id)
        readable = set()
        for s in statements:
            actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
            assert "*" not in actions and not any(a.endswith(":*") for a in actions), (name, s)
            if "secretsmanager:GetSecretValue" in actions:
                readable |= {secret_kind(lid) for lid in secrets if lid in dumps(s["Resource"])}
        assert readable == expected[name], name


# --- schedules, alarms, dashboard ----------------------------------------------------------------------------


def test_maintenance_schedules_send_each_task_on_its_schedule(env: tuple[EnvConfig, Template]) -> None:
    from functions.maintenance.handler import TASKS

    config, t = env
    rules = resources(t, "AWS::Events::Rule")
    scheduled = {json.loads(r["Targets"][0]["Input"])["task"]: r["ScheduleExpression"] for r in rules.values()
                 if "ScheduleExpression" in r}
    assert scheduled == config.schedules == SCHEDULES  # cdk.json overrides none: the local scheduler's table
    assert set(scheduled) == set(TASKS)  # every task runs on a schedule


def test_schedule_overrides_are_checked_and_laid_over_the_shared_table() -> None:
    raw = dict(CONTEXT[CONTEXT_KEY]["dev"])
    assert EnvConfig.from_context("dev", {**raw, "schedule_overrides": {"vacuum": "rate(7 days)"}}).schedules == {
        **SCHEDULES, "vacuum": "rate(7 days)"}
    with pytest.raises(ValueError, match="no maintenance task"):
        _ = EnvConfig.from_context("dev", {**raw, "schedule_overrides": {"vacum": "rate(7 days)"}}).schedules
    with pytest.raises(ValueError, match="not an EventBridge rate expression"):
        _ = EnvConfig.from_context("dev", {**raw, "schedule_overrides": {"vacuum": "every day"}}).schedules


def test_alarms_cover_the_guides_rules_and_notify_the_alerts_function(env: tuple[EnvConfig, Template]) -> None:
    config, t = env
    alarms = {a["AlarmName"].removeprefix(f"tmuxi-{config.name}-"): a
              for a in resources(t, "AWS::CloudWatch::Alarm").values()}
    names = {n.split("-")[0] for n in alarms}
    assert names == set(RULES)
    assert alarms["HighErrorRate"]["Threshold"] == config.alarm_error_rate
    assert alarms["HighResponseTime"]["Threshold"] == config.alarm_p95_latency_ms
    assert alarms["HighCPUUsage"]["Threshold"] == config.alarm_cpu_percent
    assert alarms["HighMemoryUsage"]["Threshold"] == config.alarm_memory_percent
    for name, a in alarms.items():
        rule = RULES[name.split("-")[0]]
        assert f"severity={rule.severity} rule={rule.name}" in a["AlarmDescription"]
        assert a["AlarmActions"] and a["OKActions"], name
    topic = one(t, "AWS::SNS::Topic")
    assert "KmsMasterKeyId" in topic
    subscription = one(t, "AWS::SNS::Subscription")
    assert subscription["Protocol"] == "lambda"
    dashboard = one(t, "AWS::CloudWatch::Dashboard")
    body = dumps(dashboard["DashboardBody"])
    for panel in ("Service Health", "Request Rate", "Response Time", "Active Sessions", "Error Rate"):
        assert panel in body


def test_migrations_run_on_deploy_before_the_new_code_serves(env: tuple[EnvConfig, Template]) -> None:
    _, t = env
    triggers = {lid: r for lid, r in t["Resources"].items() if r["Type"] == "Custom::Trigger"}
    (trigger_id, trigger), = triggers.items()
    (migrate,) = [lid for lid, f in _functions(t).items() if f["Handler"] == "functions.migrate.handler.handler"]
    (version,) = [lid for lid, v in resources(t, "AWS::Lambda::Version").items()
                  if v["FunctionName"] == {"Ref": migrate}]
    assert trigger["Properties"]["HandlerArn"] == {"Ref": version}
    db = next(iter(resources(t, "AWS::RDS::DBInstance")))
    assert db in trigger.get("DependsOn", [])
    service = next(lid for lid, r in t["Resources"].items() if r["Type"] == "AWS::ECS::Service")
    assert trigger_id in t["Resources"][service].get("DependsOn", [])


def test_environment_config_rejects_unknown_and_missing_keys() -> None:
    raw = dict(CONTEXT[CONTEXT_KEY]["dev"])
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        EnvConfig.from_context("dev", {**raw, "colour": "blue"})
    raw.pop("max_azs")
    with pytest.raises(ValueError, match="missing keys \\['max_azs'\\]"):
        EnvConfig.from_context("dev", raw)
    with pytest.raises(ValueError, match="host_drain_timeout_s"):
        EnvConfig.from_context("dev", {**CONTEXT[CONTEXT_KEY]["dev"], "host_drain_timeout_s": 110})

"""The two API Gateway APIs, both from the route tables in ``tmuxi.routes`` (the local gateway serves the same
tables, so the two surfaces cannot drift):

- REST: every route of ``ROUTES`` -> the function it names (proxy; the api function, or the mcp function for
  ``/mcp``), the Lambda REQUEST authorizer on the protected ones, the configured gateway responses, stage
  throttling, access logs (JSON) and X-Ray.
- WebSocket: ``WS_ROUTES``. ``$connect``, ``$disconnect``, ``attach`` and ``detach`` run the ws function (the last
  two answer the client: two-way routes); ``$default`` (keystrokes, resizes, pings) is an HTTP integration over a
  VPC link to the hosts' NLB, with the connection id and the host secret as request headers: no function runs per
  keystroke.
"""
from __future__ import annotations

import json

from aws_cdk import Duration, RemovalPolicy, SecretValue, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_apigatewayv2 as apigwv2
from aws_cdk import aws_apigatewayv2_integrations as integrations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as sm
from cdk_nag import NagSuppressions
from constructs import Construct

from cdk.config import EnvConfig
from cdk.data import retention
from cdk.host import Host
from cdk.names import NLB_PORT
from tmuxi.host_client import SECRET_HEADER
from tmuxi.routes import (
    AUTHORIZER,
    GATEWAY_RESPONSES,
    ROUTES,
    WS_CONNECTION_HEADER,
    WS_HOST_MESSAGE_PATH,
    WS_ROUTE_SELECTION,
    WS_ROUTES,
)

STAGE = "v1"
# the ws function's answer to attach / detach goes back to the client (a two-way route)
TWO_WAY_ROUTES = frozenset({"attach", "detach"})
# one JSON line per connect, message and disconnect (never a message's body)
WS_ACCESS_LOG_FORMAT = json.dumps({
    "requestId": "$context.requestId", "connectionId": "$context.connectionId", "eventType": "$context.eventType",
    "routeKey": "$context.routeKey", "status": "$context.status", "ip": "$context.identity.sourceIp",
    "requestTime": "$context.requestTimeEpoch", "integrationLatency": "$context.integrationLatency",
    "integrationError": "$context.integration.error"}, separators=(",", ":"))


class RestApi(Construct):
    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig, api: lambda_.IFunction,
                 authorizer: lambda_.IFunction, mcp: lambda_.IFunction) -> None:
        super().__init__(scope, cid)
        access_logs = logs.LogGroup(self, "AccessLogs", retention=retention(config.log_retention_days),
                                    removal_policy=RemovalPolicy.DESTROY)
        self.api = apigw.RestApi(
            self, "Rest", rest_api_name=f"tmuxi-{config.name}", cloud_watch_role=True,
            cloud_watch_role_removal_policy=RemovalPolicy.DESTROY,
            endpoint_types=[apigw.EndpointType.REGIONAL],
            deploy_options=apigw.StageOptions(
                stage_name=STAGE, throttling_rate_limit=config.throttle_rate_limit,
                throttling_burst_limit=config.throttle_burst_limit, tracing_enabled=True, metrics_enabled=True,
                logging_level=apigw.MethodLoggingLevel.ERROR, data_trace_enabled=False,
                access_log_destination=apigw.LogGroupLogDestination(access_logs),
                access_log_format=apigw.AccessLogFormat.json_with_standard_fields(
                    caller=False, http_method=True, ip=True, protocol=True, request_time=True, resource_path=True,
                    response_length=True, status=True, user=True)),
        )
        self.authorizer = apigw.RequestAuthorizer(
            self, "Authorizer", handler=authorizer, identity_sources=[AUTHORIZER.identity_source],
            results_cache_ttl=Duration.seconds(AUTHORIZER.result_ttl_s))
        integrations = {"api": apigw.LambdaIntegration(api, proxy=True),  # tmuxi.routes.Route.function
                        "mcp": apigw.LambdaIntegration(mcp, proxy=True)}
        for route in ROUTES:
            resource = self.api.root.resource_for_path(route.resource)
            resource.add_method(
                route.method, integrations[route.function], operation_name=route.name,
                authorizer=self.authorizer if route.protected else None,
                authorization_type=apigw.AuthorizationType.CUSTOM if route.protected else apigw.AuthorizationType.NONE)
        for kind, response in GATEWAY_RESPONSES.items():
            self.api.add_gateway_response(
                f"{kind}Response", type=apigw.ResponseType.of(kind), status_code=str(response.status),
                templates={"application/json": response.template()},
                response_headers={k: f"'{v}'" for k, v in response.headers.items()})
        stack = Stack.of(self)
        NagSuppressions.add_resource_suppressions(self.api, [
            {"id": "AwsSolutions-APIG2", "reason": "the API function validates every request body against its "
                                                   "models and answers 400/422 with what was wrong"},
            {"id": "AwsSolutions-APIG4", "reason": "the public routes are the login, health checks and the API "
                                                   "description (tmuxi.routes.ROUTES protected=False); every "
                                                   "other route runs the Lambda authorizer"},
            {"id": "AwsSolutions-COG4", "reason": "users and tokens are the system's own (JWT, RFC 8725), checked "
                                                  "by the Lambda REQUEST authorizer, not Cognito"},
            {"id": "AwsSolutions-IAM4", "reason": "API Gateway's account-level CloudWatch role uses AWS's managed "
                                                  "AmazonAPIGatewayPushToCloudWatchLogs policy",
             "appliesTo": ["Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                           "AmazonAPIGatewayPushToCloudWatchLogs"]},
        ], apply_to_children=True)
        del stack

    @property
    def url(self) -> str:
        return self.api.url

    @property
    def base_url(self) -> str:
        """The stage's URL from the API's id alone: for a function the API invokes (``api.url`` names the
        deployment, which depends on the API's methods, which depend on the function: a cycle)."""
        stack = Stack.of(self)
        return f"https://{self.api.rest_api_id}.execute-api.{stack.region}.{stack.url_suffix}/{STAGE}"


class WebSocketApi(Construct):
    def __init__(self, scope: Construct, cid: str, *, config: EnvConfig, ws: lambda_.IFunction, host: Host,
                 host_secret: sm.ISecret) -> None:
        super().__init__(scope, cid)
        function_integration = integrations.WebSocketLambdaIntegration("Ws", ws)
        routes = {r.key: r.target for r in WS_ROUTES}
        self.api = apigwv2.WebSocketApi(
            self, "WebSocket", api_name=f"tmuxi-{config.name}-ws", route_selection_expression=WS_ROUTE_SELECTION,
            connect_route_options=apigwv2.WebSocketRouteOptions(integration=function_integration),
            disconnect_route_options=apigwv2.WebSocketRouteOptions(integration=function_integration))
        for key, target in routes.items():
            if key.startswith("$") or target != "function":
                continue
            self.api.add_route(key, integration=function_integration, return_response=key in TWO_WAY_ROUTES)
        access_logs = logs.LogGroup(self, "AccessLogs", retention=retention(config.log_retention_days),
                                    removal_policy=RemovalPolicy.DESTROY)
        self.stage = apigwv2.WebSocketStage(
            self, "Stage", web_socket_api=self.api, stage_name=STAGE, auto_deploy=True,
            throttle=apigwv2.ThrottleSettings(rate_limit=config.throttle_rate_limit * 10,
                                              burst_limit=config.throttle_burst_limit * 10))
        stage = self.stage.node.default_child
        assert isinstance(stage, apigwv2.CfnStage)
        stage.access_log_settings = apigwv2.CfnStage.AccessLogSettingsProperty(
            destination_arn=access_logs.log_group_arn, format=WS_ACCESS_LOG_FORMAT)

        # `$default` -> the hosts, no Lambda per keystroke
        self.vpc_link = apigw.VpcLink(self, "VpcLink", targets=[host.nlb], description="WebSocket $default -> hosts")
        secret_header = SecretValue.secrets_manager(host_secret.secret_arn, json_field="host_secret")
        integration = apigwv2.CfnIntegration(
            self, "HostsIntegration", api_id=self.api.api_id, integration_type="HTTP_PROXY",
            integration_method="POST", connection_type="VPC_LINK", connection_id=self.vpc_link.vpc_link_id,
            integration_uri=f"http://{host.nlb.load_balancer_dns_name}:{NLB_PORT}{WS_HOST_MESSAGE_PATH}",
            timeout_in_millis=10_000,
            request_parameters={
                f"integration.request.header.{WS_CONNECTION_HEADER}": "context.connectionId",
                # a dynamic reference, resolved by CloudFormation at deploy time: never in the template
                f"integration.request.header.{SECRET_HEADER}": f"'{secret_header.unsafe_unwrap()}'",
            })
        apigwv2.CfnRoute(self, "DefaultRoute", api_id=self.api.api_id, route_key="$default",
                         target=f"integrations/{integration.ref}")
        NagSuppressions.add_resource_suppressions(self, [
            {"id": "AwsSolutions-APIG4", "reason": "$connect authenticates a single-use connect ticket in the "
                                                   "ws function (browsers cannot send headers on a handshake); "
                                                   "other routes belong to a connection that passed $connect"},
        ], apply_to_children=True)

    @property
    def management_endpoint(self) -> str:
        """Where hosts post output (``post_to_connection``): https://{api}.execute-api.{region}.amazonaws.com/{stage}"""
        return self.stage.callback_url

    def grant_manage_connections(self, grantee: iam.IGrantable) -> None:
        self.api.grant_manage_connections(grantee)

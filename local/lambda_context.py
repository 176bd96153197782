"""A LambdaContext look-alike for invoking the Lambda handlers in-process (local gateway, tests, scripts)."""
from __future__ import annotations

import time
import uuid


class LambdaContext:
    """The attributes and method the AWS runtime's context object has (what Powertools and Mangum read)."""

    __slots__ = ("function_name", "function_version", "invoked_function_arn", "memory_limit_in_mb",
                 "aws_request_id", "log_group_name", "log_stream_name", "identity", "client_context",
                 "_deadline")

    def __init__(self, function_name: str = "local", timeout_s: float = 30.0, memory_mb: int = 512,
                 region: str = "us-east-1", account_id: str = "123456789012",
                 request_id: str | None = None) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{region}:{account_id}:function:{function_name}"
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = request_id or str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        self.identity = None
        self.client_context = None
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

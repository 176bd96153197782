"""Schema migrations as a deployment step: the Lambda function the CDK app invokes on every deploy (``handler.py``)."""

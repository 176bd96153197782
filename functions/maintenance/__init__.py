"""Scheduled maintenance: the Lambda function EventBridge schedules invoke (``handler.py``)."""

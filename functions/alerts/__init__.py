"""Alerts function: CloudWatch alarm notifications through SNS."""

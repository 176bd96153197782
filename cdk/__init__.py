"""The AWS definition of the system: one CDK app, one stack per environment (dev, staging, prod)."""

"""The Lambda functions: ``api`` (FastAPI behind Mangum) and ``authorizer`` (REST REQUEST authorizer)."""

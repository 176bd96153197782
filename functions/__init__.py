"""The Lambda functions: ``api`` (FastAPI behind Mangum) and ``authorizer`` (API Gateway REQUEST authorizer)."""

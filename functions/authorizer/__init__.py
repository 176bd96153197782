"""The API Gateway Lambda REQUEST authorizer (``handler.py``)."""

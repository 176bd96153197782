"""The REST API Lambda: a FastAPI app (``app.py``) behind Mangum (``handler.py``)."""

"""The WebSocket API's control Lambda (``handler.py``): $connect, $disconnect, attach, detach."""

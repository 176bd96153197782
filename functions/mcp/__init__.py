"""The MCP Lambda: MCP's Streamable HTTP transport behind Mangum (``handler.py``), the tools in ``tmuxi.mcp``."""

"""PostgreSQL access: the connection pool, versioned migrations and the repository (all SQL lives here)."""

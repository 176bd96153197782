"""PostgreSQL access: the connection pool and its circuit breaker, versioned migrations (a command of their own:
``python -m tmuxi.db.migrate``) and the repository (all SQL lives here)."""

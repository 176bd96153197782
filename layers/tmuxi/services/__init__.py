"""The logic layer: what the handlers call. Services use the repository, the cache and the host client; they
never touch psycopg, redis or HTTP themselves."""

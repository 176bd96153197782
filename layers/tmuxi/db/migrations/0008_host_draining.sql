-- A host told to go (SIGTERM from ECS: a deploy, a scale-in) drains: it keeps serving the sessions it holds while
-- their users finish, and takes no new ones. Placement skips a host whose draining_at is set (db/repo.py
-- PLACEMENT_SQL). The flag belongs to one run of the host: a heartbeat from a new run (another started_at) clears
-- it (db/repo.py upsert_host), so a host id that comes back is placed on again.
ALTER TABLE hosts ADD COLUMN draining_at timestamptz;

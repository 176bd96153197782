-- GET /sessions pages by keyset, newest first: ORDER BY created_at DESC, id DESC after the (created_at, id) of
-- the previous page's last row (db/repo.py list_sessions_query). Each filter it offers has an index in that
-- order, so a page reads its rows and one more however many sessions there are, live or ended (btree indexes
-- are read backwards for DESC). The live filter is written out as state IN ('creating', 'active') in the query
-- so the partial indexes match in every plan.

-- a user's own sessions: all of them, one state, or the live ones
CREATE INDEX sessions_owner_created ON sessions (owner_id, created_at, id);
CREATE INDEX sessions_owner_state_created ON sessions (owner_id, state, created_at, id);
CREATE INDEX sessions_owner_live_created ON sessions (owner_id, created_at, id) WHERE state IN ('creating', 'active');
-- an admin's listing of every user's sessions, the same three ways
CREATE INDEX sessions_created ON sessions (created_at, id);
CREATE INDEX sessions_state_created ON sessions (state, created_at, id);
CREATE INDEX sessions_live_created ON sessions (created_at, id) WHERE state IN ('creating', 'active');

-- (owner_id, state, created_at, id) serves everything (owner_id, state) did (the quota count)
DROP INDEX sessions_owner_state;

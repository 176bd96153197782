-- One session state machine, enforced here, where the data lives. The API inserts a session 'creating' (a restore
-- from a backup inserts any state); then:
--   creating -> active    its host made the tmux session and the API activated it
--   creating -> failed    its creation did not complete (rolled back: by the API, or by reconciliation)
--   creating, active -> deleting   a delete was asked for: it wins over a create still in flight
--   deleting -> deleted   its tmux session was killed (by the API, or by reconciliation)
--   creating, active -> exited     its shell exited (reported by its host)
--   creating, active -> lost       its host died, its tmux server died, or its host does not have it
-- deleted, failed, exited and lost are final. Code names the states an update may come from in its WHERE
-- (db/repo.py FROM_STATES), so a refused transition changes no row; this trigger makes any other write fail.
ALTER TABLE sessions DROP CONSTRAINT sessions_state_check;
ALTER TABLE sessions ADD CONSTRAINT sessions_state_check
    CHECK (state IN ('creating', 'active', 'deleting', 'deleted', 'failed', 'lost', 'exited'));
-- when the state last changed: reconciliation finds sessions stuck in between by it
ALTER TABLE sessions ADD COLUMN state_changed_at timestamptz NOT NULL DEFAULT now();

CREATE FUNCTION sessions_state_machine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF (OLD.state, NEW.state) NOT IN (
            ('creating', 'active'), ('creating', 'failed'), ('creating', 'deleting'), ('active', 'deleting'),
            ('deleting', 'deleted'), ('creating', 'exited'), ('active', 'exited'), ('creating', 'lost'),
            ('active', 'lost')) THEN
            RAISE EXCEPTION 'session % cannot go from % to %', OLD.id, OLD.state, NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
        NEW.state_changed_at := now();
        IF NEW.state IN ('deleted', 'failed', 'exited', 'lost') THEN
            NEW.ended_at := coalesce(NEW.ended_at, now());
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER sessions_state_machine BEFORE UPDATE OF state ON sessions
    FOR EACH ROW EXECUTE FUNCTION sessions_state_machine();

-- reconciliation's scan: the few sessions in between, oldest first
CREATE INDEX sessions_in_between ON sessions (state_changed_at) WHERE state IN ('creating', 'deleting');

-- A host the API could not reach is skipped by placement until its next heartbeat (unreachable_at older than
-- last_heartbeat): a create is retried on another host at once, not for the whole dead-after window.
ALTER TABLE hosts ADD COLUMN unreachable_at timestamptz;

-- A host that stopped on purpose (SIGTERM: a deploy, a scale-in) says so; one whose heartbeat stops without it has
-- died, and /health reports it. The sessions of either are declared lost once its heartbeat is stale.
ALTER TABLE hosts ADD COLUMN stopped_at timestamptz;

-- Scheduled maintenance (functions/maintenance, services/maintenance.py): one row per run of a task. A run is
-- inserted 'running' and finished 'ok' or 'failed' (a run whose process died stays 'running', finished_at NULL:
-- that is how a crashed run shows); a run that found another run of its task holding the task's advisory lock is
-- recorded 'skipped' and did nothing.
CREATE TABLE maintenance_runs (
    id           bigserial PRIMARY KEY,
    task         text NOT NULL CHECK (length(task) BETWEEN 1 AND 64),
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    status       text NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'skipped')),
    result       jsonb NOT NULL DEFAULT '{}'::jsonb,
    error        text
);
CREATE INDEX maintenance_runs_task ON maintenance_runs (task, started_at DESC);

-- cleanup's scan: active sessions by last activity (a range, oldest first, whatever the table's size)
CREATE INDEX sessions_active_idle ON sessions (last_active_at) WHERE state = 'active';
-- retention's scans: ended sessions by when they ended, audit events by age
CREATE INDEX sessions_ended_at ON sessions (ended_at) WHERE ended_at IS NOT NULL;
CREATE INDEX audit_events_at ON audit_events (at);

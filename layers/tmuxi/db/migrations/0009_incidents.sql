-- Incidents (operations guide, "Incident Response"): opened, updated and resolved by the alerts function from
-- CloudWatch alarm notifications (services/incidents.py). One incident per alarm at a time: the alarm's name is
-- the key, and the partial unique index below lets a key have at most one incident not yet resolved, so two
-- notifications of one alarm handled at once (SNS delivers concurrently) give one incident: the second's
-- INSERT ... ON CONFLICT becomes an update of the first's row (db/incidents.py record_alarm).
CREATE TABLE incidents (
    id            bigserial PRIMARY KEY,
    key           text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    priority      text NOT NULL CHECK (priority IN ('P1', 'P2', 'P3', 'P4')),
    rule          text NOT NULL,
    title         text NOT NULL,
    status        text NOT NULL DEFAULT 'investigating'
                  CHECK (status IN ('investigating', 'identified', 'monitoring', 'resolved')),
    opened_at     timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    last_state    text NOT NULL,
    update_count  integer NOT NULL DEFAULT 1 CHECK (update_count >= 1),
    last_reason   text NOT NULL DEFAULT '',
    CHECK ((status = 'resolved') = (resolved_at IS NOT NULL))
);
CREATE UNIQUE INDEX incidents_one_open_per_key ON incidents (key) WHERE resolved_at IS NULL;
-- list_incidents: newest first, since a time
CREATE INDEX incidents_opened ON incidents (opened_at);

-- What happened to an incident, in order: its alarm notifications and the messages sent (or not) about it.
CREATE TABLE incident_events (
    id           bigserial PRIMARY KEY,
    incident_id  bigint NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT now(),
    kind         text NOT NULL CHECK (kind IN ('opened', 'updated', 'resolved', 'notified', 'notify_failed')),
    detail       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX incident_events_incident ON incident_events (incident_id, id);

-- users, tmux hosts, sessions, audit events, revoked tokens
CREATE TABLE users (
    id             uuid PRIMARY KEY,
    username       text NOT NULL UNIQUE CHECK (length(username) BETWEEN 1 AND 64),
    password_hash  text NOT NULL,
    role           text NOT NULL CHECK (role IN ('user', 'admin')),
    disabled       boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE hosts (
    id               text PRIMARY KEY,
    url              text NOT NULL,
    capacity         integer NOT NULL CHECK (capacity >= 0),
    active_sessions  integer NOT NULL DEFAULT 0,
    started_at       timestamptz,
    last_heartbeat   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id              uuid PRIMARY KEY,
    owner_id        uuid NOT NULL REFERENCES users (id),
    name            text CHECK (name IS NULL OR length(name) BETWEEN 1 AND 64),
    state           text NOT NULL CHECK (state IN ('creating', 'active', 'deleted', 'failed', 'lost')),
    host_id         text REFERENCES hosts (id),
    shard           integer,
    tmux_name       text NOT NULL,
    pane_id         text,
    cols            integer NOT NULL,
    rows            integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_active_at  timestamptz NOT NULL DEFAULT now(),
    ended_at        timestamptz,
    end_reason      text
);
CREATE INDEX sessions_owner_state ON sessions (owner_id, state);
CREATE INDEX sessions_host_state ON sessions (host_id, state);

CREATE TABLE audit_events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor_id    uuid,
    action      text NOT NULL,
    session_id  uuid,
    status      text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_events_session ON audit_events (session_id, at);
CREATE INDEX audit_events_actor ON audit_events (actor_id, at);

CREATE TABLE revoked_tokens (
    jti         text PRIMARY KEY,
    user_id     uuid,
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX revoked_tokens_expires ON revoked_tokens (expires_at);

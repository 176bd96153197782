-- Live terminals over WebSocket (docs/websocket.md): read-only shares, connect tickets, open connections.
-- Secrets (share tokens, tickets) are stored as their SHA-256 only: a copy of the database lets no one watch a
-- session or open a connection. They are 256-bit random values, so an unsalted hash is enough (nothing to guess).

-- A read-only share of a session, minted by its owner: whoever holds the token may watch the session until it
-- expires or is revoked (and while its creator's account is enabled). Rows stay after expiry (GET .../shares).
CREATE TABLE ws_shares (
    id          uuid PRIMARY KEY,
    session_id  uuid NOT NULL REFERENCES sessions (id),
    created_by  uuid NOT NULL REFERENCES users (id),
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (expires_at > created_at)
);
-- GET /sessions/{id}/shares, newest first
CREATE INDEX ws_shares_session ON ws_shares (session_id, created_at);

-- A connect ticket (POST /ws/tickets, POST /ws/share-tickets): single use, short-lived. Consumed by $connect with
-- one UPDATE ... WHERE used_at IS NULL AND expires_at > now(), so two handshakes racing with one ticket cannot
-- both win. Either a user's (user_id; any session of theirs) or a share viewer's (share_id: that share's session,
-- read-only).
CREATE TABLE ws_tickets (
    ticket_hash  bytea PRIMARY KEY CHECK (length(ticket_hash) = 32),
    user_id      uuid REFERENCES users (id),
    share_id     uuid REFERENCES ws_shares (id),
    session_id   uuid REFERENCES sessions (id),
    read_only    boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz,
    CHECK ((user_id IS NULL) <> (share_id IS NULL)),
    CHECK (share_id IS NULL OR (session_id IS NOT NULL AND read_only))
);
-- pruning (services/live.py prune)
CREATE INDEX ws_tickets_expires ON ws_tickets (expires_at);

-- An open WebSocket connection (id: API Gateway's connectionId), from $connect to $disconnect, and the session it
-- is attached to, if any: session_id and host_id are set together (the host holding the viewer; the tmux hosts
-- forward `$default` messages there, registry.connection_target). A share viewer's connection may attach only
-- scope_session_id, read-only.
CREATE TABLE ws_connections (
    id                text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    user_id           uuid REFERENCES users (id),
    share_id          uuid REFERENCES ws_shares (id),
    scope_session_id  uuid REFERENCES sessions (id),
    session_id        uuid REFERENCES sessions (id),
    host_id           text REFERENCES hosts (id),
    read_only         boolean NOT NULL DEFAULT false,
    connected_at      timestamptz NOT NULL DEFAULT now(),
    attached_at       timestamptz,
    source_ip         text,
    CHECK ((user_id IS NULL) <> (share_id IS NULL)),
    CHECK (share_id IS NULL OR scope_session_id IS NOT NULL),
    CHECK ((session_id IS NULL) = (host_id IS NULL))
);
-- a revoked share's viewers, detached at once
CREATE INDEX ws_connections_share ON ws_connections (share_id) WHERE share_id IS NOT NULL;
-- pruning connections whose $disconnect never came (API Gateway closes every connection after 2 hours)
CREATE INDEX ws_connections_connected ON ws_connections (connected_at);

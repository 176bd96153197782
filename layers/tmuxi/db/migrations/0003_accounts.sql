-- Each user runs as an OS account of their own on the tmux hosts: account N is uid/gid account_uid_base + N on
-- every host. Allocated on the user's first session, never reused.
CREATE SEQUENCE users_account_no_seq START 1;
ALTER TABLE users ADD COLUMN account_no integer UNIQUE CHECK (account_no > 0);

-- tmux sessions a user made from a shell (not through the API): theirs to use, counted against their quota.
-- Reported by each host with its heartbeat; only live hosts' reports count.
CREATE TABLE host_extra_sessions (
    host_id     text NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    account_no  integer NOT NULL,
    sessions    integer NOT NULL CHECK (sessions > 0),
    PRIMARY KEY (host_id, account_no)
);

-- Sessions live on their owner's tmux server: there are no shards any more.
ALTER TABLE sessions DROP COLUMN shard;

-- Tokens follow their user. Every change that must end a user's tokens (disable, delete, a role change, a new
-- password, "end all their tokens") adds one to token_epoch in the transaction that makes the change; a token
-- carries the epoch it was issued under and is refused once the user's differs (services/auth.py).
ALTER TABLE users ADD COLUMN token_epoch integer NOT NULL DEFAULT 0 CHECK (token_epoch >= 0);

-- A deleted user is disabled for good and keeps its row, which the audit trail and old sessions refer to; its
-- name stays taken.
ALTER TABLE users ADD COLUMN deleted_at timestamptz;
ALTER TABLE users ADD CONSTRAINT users_deleted_is_disabled CHECK (deleted_at IS NULL OR disabled);

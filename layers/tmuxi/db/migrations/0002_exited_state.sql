-- A session whose shell exited (the user typed `exit`, a command ended it) is 'exited': it is over, and unlike
-- 'lost' nothing went wrong.
ALTER TABLE sessions DROP CONSTRAINT sessions_state_check;
ALTER TABLE sessions ADD CONSTRAINT sessions_state_check
    CHECK (state IN ('creating', 'active', 'deleted', 'failed', 'lost', 'exited'));

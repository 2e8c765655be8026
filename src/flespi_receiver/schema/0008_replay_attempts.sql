-- `flespi-receiver rejected replay` runs quarantined content through the store again: what
-- still fails stays, counting the attempts. Constant defaults: no rewrite of the table.
ALTER TABLE rejected_messages
    ADD COLUMN replay_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN last_replay_at  timestamptz;

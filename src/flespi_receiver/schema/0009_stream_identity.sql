-- Per stream, what message_hash is the hash of: 'text', the message as sent (every stream
-- until it sets identity = "content"), or 'content', the message however spelled
-- (flespi_receiver/identity.py). A stream switched to content has the rows it stored before
-- re-keyed by `flespi-receiver migrate` (and `serve`, at start) in small transactions,
-- newest first; next_id records how far that got. Nothing of messages is touched here.
CREATE TABLE stream_identity (
    stream      text        PRIMARY KEY,
    identity    text        NOT NULL CHECK (identity IN ('text', 'content')),
    -- rows of the stream with id <= next_id may still be keyed by their text; NULL: none
    next_id     bigint,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

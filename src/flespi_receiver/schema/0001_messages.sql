-- Messages as flespi sent them, one row per message, each stored exactly once per stream.

CREATE TABLE messages (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream       text        NOT NULL,
    ident        text,
    ts           timestamptz,
    server_ts    timestamptz,
    received_at  timestamptz NOT NULL DEFAULT now(),
    channel_id   bigint,
    device_id    bigint,
    latitude     double precision,
    longitude    double precision,
    payload      jsonb       NOT NULL,
    -- first 16 bytes of the SHA-256 of the message's JSON text as sent: its identity in the stream
    message_hash bytea       NOT NULL,
    CONSTRAINT messages_identity UNIQUE (stream, message_hash)
);

-- "the messages of one device in a time range"
CREATE INDEX messages_ident_ts ON messages (ident, ts);

-- Messages (or whole bodies) that could not be stored as they are, kept byte for byte.
CREATE TABLE rejected_messages (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream      text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    raw         bytea       NOT NULL,
    reason      text        NOT NULL,
    -- first 16 bytes of the SHA-256 of raw: the same bad content sent again is kept once
    raw_hash    bytea       NOT NULL,
    CONSTRAINT rejected_messages_identity UNIQUE (stream, raw_hash)
);
CREATE INDEX rejected_messages_received_at ON rejected_messages (received_at);

-- Ready for time partitioning (native, or TimescaleDB) and distribution (Citus):
--  * partition_ts: a time every message has, derived from the message alone (so a re-sent
--    message gets the same one): ts, else server_ts, else 2000-01-01 00:00 UTC;
--  * every unique constraint holds the distribution column (stream) and partition_ts;
--  * id stays an identity, indexed but no longer the primary key (a primary key of a
--    partitioned or distributed table must hold the partition and distribution columns).

ALTER TABLE messages ADD COLUMN partition_ts timestamptz;
UPDATE messages SET partition_ts = coalesce(ts, server_ts, '2000-01-01 00:00:00+00');
ALTER TABLE messages ALTER COLUMN partition_ts SET NOT NULL;

ALTER TABLE messages DROP CONSTRAINT messages_identity;
ALTER TABLE messages
    ADD CONSTRAINT messages_identity UNIQUE (stream, message_hash, partition_ts);

ALTER TABLE messages DROP CONSTRAINT messages_pkey;
CREATE INDEX messages_id ON messages (id);

ALTER TABLE rejected_messages DROP CONSTRAINT rejected_messages_pkey;
ALTER TABLE rejected_messages ADD PRIMARY KEY (stream, id);

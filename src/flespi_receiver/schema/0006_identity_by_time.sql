-- The same unique key, its columns ordered by time: new messages then land on the last pages
-- of the index instead of random ones, so the index's working set stays small and inserts
-- stay fast as the table grows (a random hash first spreads them over the whole index).
ALTER TABLE messages DROP CONSTRAINT messages_identity;
ALTER TABLE messages
    ADD CONSTRAINT messages_identity UNIQUE (stream, partition_ts, message_hash);

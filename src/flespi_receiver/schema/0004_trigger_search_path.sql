-- The trigger must find device_state whatever the inserting session's search_path is (a user
-- inserting into flespi.messages from psql, a backfill script): pin it to this schema.
ALTER FUNCTION after_messages_insert() SET search_path FROM CURRENT;

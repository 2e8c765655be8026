-- The position downstream readers resume from, in the order of the transactions that stored
-- the rows (docs/sql.md, "Reading every message once"): xact_id is the 64-bit id of the
-- transaction that wrote the row (xid8: it never wraps around). Every transaction below
-- pg_snapshot_xmin(pg_current_snapshot()) has finished, and a row written later always gets a
-- larger xact_id, so a reader that takes the rows below that horizon never finds one landing
-- behind its saved position, however long a batch took to arrive and commit.
--
-- The default is evaluated once for the rows already stored (no table rewrite): they all get
-- this migration's transaction id. The index on xact_id is built concurrently at start
-- (indexes.py), so that an existing big table is not locked while it is built.
ALTER TABLE messages ADD COLUMN xact_id xid8 NOT NULL DEFAULT pg_current_xact_id();

-- NOTIFY carries the batch's position too: {"stream", "count", "first_id", "last_id", "xact_id"}.
CREATE OR REPLACE FUNCTION after_messages_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    mode    text := coalesce(current_setting('flespi_receiver.device_state', true), 'on');
    merge   boolean := current_setting('flespi_receiver.device_state_merge', true) = 'on';
    channel text := coalesce(current_setting('flespi_receiver.notify_channel', true), '');
    summary json;
BEGIN
    IF mode = 'on' AND NOT merge THEN
        INSERT INTO device_state AS s (stream, ident, message_id, ts, received_at, latitude,
                                       longitude, payload, message_hash)
        SELECT DISTINCT ON (stream, ident)
               stream, ident, id, ts, received_at, latitude, longitude, payload, message_hash
        FROM new_messages
        WHERE ident IS NOT NULL
        ORDER BY stream, ident, coalesce(ts, '-infinity'::timestamptz) DESC, message_hash DESC
        ON CONFLICT (stream, ident) DO UPDATE
        SET message_id = excluded.message_id, ts = excluded.ts,
            received_at = excluded.received_at, latitude = excluded.latitude,
            longitude = excluded.longitude, payload = excluded.payload,
            message_hash = excluded.message_hash, updated_at = now()
        WHERE is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash);
    ELSIF mode = 'on' THEN
        -- the batch folded per device first, oldest to newest; then folded into the state
        INSERT INTO device_state AS s (stream, ident, message_id, ts, received_at, latitude,
                                       longitude, payload, message_hash)
        SELECT stream, ident,
               (array_agg(id ORDER BY o DESC))[1],
               (array_agg(ts ORDER BY o DESC))[1],
               (array_agg(received_at ORDER BY o DESC))[1],
               (array_agg(latitude ORDER BY o DESC) FILTER (WHERE latitude IS NOT NULL))[1],
               (array_agg(longitude ORDER BY o DESC) FILTER (WHERE longitude IS NOT NULL))[1],
               jsonb_merge(payload ORDER BY o),
               (array_agg(message_hash ORDER BY o DESC))[1]
        FROM (SELECT *, (coalesce(ts, '-infinity'::timestamptz), message_hash) AS o
              FROM new_messages WHERE ident IS NOT NULL) AS batch
        GROUP BY stream, ident
        ON CONFLICT (stream, ident) DO UPDATE
        -- every column: the later message's value, computed on the locked row, so that two
        -- receivers updating one device at once both count
        SET message_id = CASE WHEN is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash)
                              THEN excluded.message_id ELSE s.message_id END,
            ts = CASE WHEN is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash)
                      THEN excluded.ts ELSE s.ts END,
            received_at = CASE WHEN is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash)
                               THEN excluded.received_at ELSE s.received_at END,
            message_hash = CASE WHEN is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash)
                                THEN excluded.message_hash ELSE s.message_hash END,
            -- the latest known position; a late message only fills in what was never seen
            latitude = CASE WHEN is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash)
                            THEN coalesce(excluded.latitude, s.latitude)
                            ELSE coalesce(s.latitude, excluded.latitude) END,
            longitude = CASE WHEN is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash)
                             THEN coalesce(excluded.longitude, s.longitude)
                             ELSE coalesce(s.longitude, excluded.longitude) END,
            payload = CASE WHEN is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash)
                           THEN s.payload || excluded.payload
                           ELSE excluded.payload || s.payload END,
            updated_at = now();
    END IF;

    IF channel <> '' THEN
        SELECT json_build_object('stream', min(stream), 'count', count(*),
                                 'first_id', min(id), 'last_id', max(id),
                                 'xact_id', pg_current_xact_id()::text::numeric)
        INTO summary
        FROM new_messages
        HAVING count(*) > 0;
        IF summary IS NOT NULL THEN
            PERFORM pg_notify(channel, summary::text);
        END IF;
    END IF;
    RETURN NULL;
END
$$;


-- The latest state of every device, and a notification after each stored batch, both kept by a
-- statement trigger on messages: in the same transaction as the insert, whatever path inserted.
--
-- Each receiver session says what it wants through settings of its own (see app.py):
--   flespi_receiver.device_state        'on' (default) or 'off'
--   flespi_receiver.device_state_merge  'off' (default): the state is the latest message;
--                                       'on': it keeps the last known value of every parameter
--   flespi_receiver.notify_channel      NOTIFY channel after each batch; '' = none

CREATE TABLE device_state (
    stream       text        NOT NULL,
    ident        text        NOT NULL,
    message_id   bigint      NOT NULL,  -- messages.id of the latest message
    ts           timestamptz,           -- its device time
    received_at  timestamptz NOT NULL,
    latitude     double precision,
    longitude    double precision,
    payload      jsonb       NOT NULL,
    message_hash bytea       NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, ident)
);

-- jsonb || jsonb as an aggregate: later values win, keys missing later are kept
CREATE AGGREGATE jsonb_merge(jsonb) (SFUNC = jsonb_concat, STYPE = jsonb);

-- "Later" means by device time, a message without time being older than any with one;
-- equal times are ordered by identity, so the result never depends on arrival order.
CREATE FUNCTION is_later(ts timestamptz, message_hash bytea, than_ts timestamptz,
                         than_hash bytea) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (coalesce(ts, '-infinity'::timestamptz), message_hash)
     > (coalesce(than_ts, '-infinity'::timestamptz), than_hash);

CREATE FUNCTION after_messages_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
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
                                 'first_id', min(id), 'last_id', max(id))
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

CREATE TRIGGER messages_after_insert
    AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_messages
    FOR EACH STATEMENT EXECUTE FUNCTION after_messages_insert();

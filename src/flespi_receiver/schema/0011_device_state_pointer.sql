-- device_state no longer holds a second copy of every device's latest message: the table
-- device_latest points at it (by the identity key of messages) and the view device_state shows
-- the same columns as before. The receiver folds each batch per device and updates the pointers
-- itself, in the batch's transaction; the statement trigger and its transition table (a copy of
-- every inserted row) are gone. Inserts by other sessions (psql, a backfill script) still keep the
-- state, through a row trigger that the receiver's own sessions skip.

CREATE TABLE device_latest (
    stream           text        NOT NULL,
    ident            text        NOT NULL,
    -- the latest message: its device time and its key in messages
    ts               timestamptz,
    message_hash     bytea       NOT NULL,
    partition_ts     timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- Set only when the view must not show the message's own values: in merge mode (the last
    -- known value of every parameter), or once the message itself is gone (retention).
    payload          jsonb,
    latitude         double precision,
    longitude        double precision,
    message_id       bigint,
    received_at      timestamptz,
    -- merge mode: for every parameter, state_order() of the message its value came from
    parameter_orders jsonb,
    latitude_order   text,
    longitude_order  text,
    PRIMARY KEY (stream, ident)
) WITH (fillfactor = 70);  -- room on each page, so that moving a pointer is a HOT update

-- Where a message stands in "latest" order, as text that sorts the same way as
-- (coalesce(ts, '-infinity'), message_hash): microseconds since 1900 plus one (0 = no time) in 15
-- hex digits, then the identity in hex. The receiver computes the same text (device_state.py).
CREATE FUNCTION state_order(ts timestamptz, message_hash bytea) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
-- immutable operators only (no extract() from a timestamptz), so that PostgreSQL inlines it
RETURN lpad(to_hex(CASE WHEN ts IS NULL OR ts = '-infinity' THEN 0
                        WHEN ts = 'infinity' THEN 1152921504606846975
                        ELSE least(greatest(
                            (extract(epoch FROM ts - '1900-01-01 00:00:00+00') * 1000000)::bigint
                            + 1, 1), 1152921504606846975) END), 15, '0')
       || encode(message_hash, 'hex');

-- Every parameter of a payload, with one order.
CREATE FUNCTION state_orders(payload jsonb, state_order text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(payload) = 'object' THEN
    (SELECT coalesce(jsonb_object_agg(key, state_order), '{}') FROM jsonb_object_keys(payload) AS key)
ELSE '{}' END;

-- The values of `later` whose order is after the one each parameter has in `payload`.
CREATE FUNCTION merge_parameters(payload jsonb, orders jsonb, later jsonb, later_orders jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN payload || (SELECT coalesce(jsonb_object_agg(n.key, n.value), '{}')
                   FROM jsonb_each(later) AS n
                   WHERE later_orders ->> n.key > coalesce(orders ->> n.key, ''));

CREATE FUNCTION merge_orders(orders jsonb, later_orders jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN orders || (SELECT coalesce(jsonb_object_agg(n.key, n.value), '{}')
                  FROM jsonb_each(later_orders) AS n
                  WHERE n.value #>> '{}' > coalesce(orders ->> n.key, ''));

-- Latest mode: each device's pointer moves to the given message if it is later. One element per
-- device; p_partition_ts NULL means "the same as p_ts" (the usual case). Devices seen for the
-- first time are looked for only among those whose pointer did not move. Returns how many
-- pointers moved or were made.
CREATE FUNCTION keep_latest(p_stream text, p_idents text[], p_ts timestamptz[],
                            p_hashes bytea[], p_partition_ts timestamptz[]) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    moved text[];
    made integer;
BEGIN
    WITH pointed AS (
    UPDATE device_latest AS s
    SET ts = i.ts, message_hash = i.message_hash,
        partition_ts = coalesce(i.partition_ts, i.ts), updated_at = now(),
        -- the view shows the message itself from now on
        payload = NULL, latitude = NULL, longitude = NULL, message_id = NULL,
        received_at = NULL, parameter_orders = NULL, latitude_order = NULL,
        longitude_order = NULL
    FROM unnest(p_idents, p_ts, p_hashes, p_partition_ts)
         AS i(ident, ts, message_hash, partition_ts)
    WHERE s.stream = p_stream AND s.ident = i.ident
      AND is_later(i.ts, i.message_hash, s.ts, s.message_hash)
    RETURNING s.ident
    )
    SELECT coalesce(array_agg(ident), '{}') INTO moved FROM pointed;
    IF cardinality(moved) = cardinality(p_idents) THEN
        RETURN cardinality(moved);
    END IF;
    -- the others: devices seen for the first time, states already later, and states another
    -- receiver made meanwhile (invisible to the UPDATE above): ON CONFLICT sees them all
    INSERT INTO device_latest AS s (stream, ident, ts, message_hash, partition_ts)
    SELECT p_stream, i.ident, i.ts, i.message_hash, coalesce(i.partition_ts, i.ts)
    FROM unnest(p_idents, p_ts, p_hashes, p_partition_ts)
         AS i(ident, ts, message_hash, partition_ts)
    WHERE i.ident <> ALL (moved)
    ON CONFLICT (stream, ident) DO UPDATE
    SET ts = excluded.ts, message_hash = excluded.message_hash,
        partition_ts = excluded.partition_ts, updated_at = now(), payload = NULL,
        latitude = NULL, longitude = NULL, message_id = NULL, received_at = NULL,
        parameter_orders = NULL, latitude_order = NULL, longitude_order = NULL
    WHERE is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash);
    GET DIAGNOSTICS made = ROW_COUNT;
    RETURN cardinality(moved) + made;
END
$$;

-- Merge mode: the same pointer, and every parameter (and the position) keeps the value of the
-- latest message that had it, whatever order the messages came in (p_partition_ts as in
-- keep_latest). p_oldest: the earliest order
-- among each device's parameters in this batch; when it is after the state's latest message,
-- merging is a plain ||. Everything is computed on the locked row, so that two receivers
-- updating one device at once both count. Returns how many states changed.
CREATE FUNCTION keep_merged(p_stream text, p_idents text[], p_ts timestamptz[], p_hashes bytea[],
                            p_partition_ts timestamptz[], p_oldest text[], p_payloads jsonb[],
                            p_orders jsonb[], p_latitudes float8[], p_latitude_orders text[],
                            p_longitudes float8[], p_longitude_orders text[]) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    changed integer := 0;
    n integer;
BEGIN
    -- the first pass merges into the states that have their parameters' orders (all of them,
    -- usually); the second one, if needed, after making the missing ones
    FOR pass IN 1..2 LOOP
        IF pass = 2 THEN
            INSERT INTO device_latest (stream, ident, message_hash, partition_ts, payload,
                                       parameter_orders)
            SELECT p_stream, i.ident, '\x', '-infinity', '{}', '{}'
            FROM unnest(p_idents) AS i(ident)
            ON CONFLICT (stream, ident) DO NOTHING;
            -- a state kept in latest mode (or frozen) gets its parameters' orders
            UPDATE device_latest AS s
            SET payload = b.payload, latitude = b.latitude, longitude = b.longitude,
                parameter_orders = state_orders(b.payload, b.o),
                latitude_order = CASE WHEN b.latitude IS NOT NULL THEN b.o END,
                longitude_order = CASE WHEN b.longitude IS NOT NULL THEN b.o END
            FROM (SELECT d.stream, d.ident, state_order(d.ts, d.message_hash) AS o,
                         coalesce(d.payload, m.payload, '{}') AS payload,
                         CASE WHEN d.payload IS NULL THEN m.latitude ELSE d.latitude END
                             AS latitude,
                         CASE WHEN d.payload IS NULL THEN m.longitude ELSE d.longitude END
                             AS longitude
                  FROM device_latest AS d
                  LEFT JOIN messages AS m
                    ON m.stream = d.stream AND m.partition_ts = d.partition_ts
                   AND m.message_hash = d.message_hash
                  WHERE d.stream = p_stream AND d.ident = ANY (p_idents)
                    AND d.parameter_orders IS NULL) AS b
            WHERE s.stream = b.stream AND s.ident = b.ident AND s.parameter_orders IS NULL;
        END IF;

        UPDATE device_latest AS s
        SET ts = CASE WHEN is_later(i.ts, i.message_hash, s.ts, s.message_hash)
                      THEN i.ts ELSE s.ts END,
            message_hash = CASE WHEN is_later(i.ts, i.message_hash, s.ts, s.message_hash)
                                THEN i.message_hash ELSE s.message_hash END,
            partition_ts = CASE WHEN is_later(i.ts, i.message_hash, s.ts, s.message_hash)
                                THEN i.partition_ts ELSE s.partition_ts END,
            message_id = CASE WHEN is_later(i.ts, i.message_hash, s.ts, s.message_hash)
                              THEN NULL ELSE s.message_id END,
            received_at = CASE WHEN is_later(i.ts, i.message_hash, s.ts, s.message_hash)
                               THEN NULL ELSE s.received_at END,
            payload = CASE WHEN i.oldest > state_order(s.ts, s.message_hash)
                           THEN s.payload || i.payload
                           ELSE merge_parameters(s.payload, s.parameter_orders, i.payload,
                                                 i.orders) END,
            parameter_orders = CASE WHEN i.oldest > state_order(s.ts, s.message_hash)
                                    THEN s.parameter_orders || i.orders
                                    ELSE merge_orders(s.parameter_orders, i.orders) END,
            latitude = CASE WHEN i.latitude_order > coalesce(s.latitude_order, '')
                            THEN i.latitude ELSE s.latitude END,
            latitude_order = greatest(i.latitude_order, s.latitude_order),
            longitude = CASE WHEN i.longitude_order > coalesce(s.longitude_order, '')
                             THEN i.longitude ELSE s.longitude END,
            longitude_order = greatest(i.longitude_order, s.longitude_order),
            updated_at = now()
        FROM (SELECT u.*, coalesce(u.given_partition_ts, u.ts) AS partition_ts
              FROM unnest(p_idents, p_ts, p_hashes, p_partition_ts, p_oldest, p_payloads,
                          p_orders, p_latitudes, p_latitude_orders, p_longitudes,
                          p_longitude_orders)
                   AS u(ident, ts, message_hash, given_partition_ts, oldest, payload, orders,
                        latitude, latitude_order, longitude, longitude_order)) AS i
        WHERE s.stream = p_stream AND s.ident = i.ident AND s.parameter_orders IS NOT NULL
          -- only when something changes: a message sent again changes nothing
          AND (i.oldest > state_order(s.ts, s.message_hash)
               OR i.latitude_order > coalesce(s.latitude_order, '')
               OR i.longitude_order > coalesce(s.longitude_order, '')
               OR EXISTS (SELECT FROM jsonb_each(i.orders) AS n
                          WHERE n.value #>> '{}' > coalesce(s.parameter_orders ->> n.key, '')));
        GET DIAGNOSTICS n = ROW_COUNT;
        changed := changed + n;
        EXIT WHEN changed = cardinality(p_idents);
    END LOOP;
    RETURN changed;
END
$$;

-- Inserts by sessions other than the receiver's (which keeps the state itself): one message at
-- a time, with the session's own settings, as before.
CREATE FUNCTION keep_device_state_of_row() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    o text := state_order(NEW.ts, NEW.message_hash);
BEGIN
    IF coalesce(current_setting('flespi_receiver.device_state', true), 'on') <> 'on' THEN
        RETURN NULL;
    END IF;
    IF current_setting('flespi_receiver.device_state_merge', true) = 'on' THEN
        PERFORM keep_merged(NEW.stream, ARRAY[NEW.ident], ARRAY[NEW.ts], ARRAY[NEW.message_hash],
                            ARRAY[NEW.partition_ts], ARRAY[o],
                            ARRAY[CASE WHEN jsonb_typeof(NEW.payload) = 'object'
                                       THEN NEW.payload ELSE '{}' END],
                            ARRAY[state_orders(NEW.payload, o)],
                            ARRAY[NEW.latitude],
                            ARRAY[CASE WHEN NEW.latitude IS NOT NULL THEN o END],
                            ARRAY[NEW.longitude],
                            ARRAY[CASE WHEN NEW.longitude IS NOT NULL THEN o END]);
    ELSE
        PERFORM keep_latest(NEW.stream, ARRAY[NEW.ident], ARRAY[NEW.ts], ARRAY[NEW.message_hash],
                            ARRAY[NEW.partition_ts]);
    END IF;
    RETURN NULL;
END
$$;

-- The existing state, kept as it is: a row that differs from the message it points at (merge
-- mode) keeps its own values, with every parameter at the order of that message.
INSERT INTO device_latest (stream, ident, ts, message_hash, partition_ts, updated_at, payload,
                           latitude, longitude, message_id, received_at, parameter_orders,
                           latitude_order, longitude_order)
SELECT s.stream, s.ident, s.ts, s.message_hash,
       coalesce(m.partition_ts, s.ts, '2000-01-01 00:00:00+00'), s.updated_at,
       CASE WHEN own THEN s.payload END, CASE WHEN own THEN s.latitude END,
       CASE WHEN own THEN s.longitude END,
       CASE WHEN m.id IS NULL THEN s.message_id END, CASE WHEN m.id IS NULL THEN s.received_at END,
       CASE WHEN merged THEN state_orders(s.payload, state_order(s.ts, s.message_hash)) END,
       CASE WHEN merged AND s.latitude IS NOT NULL THEN state_order(s.ts, s.message_hash) END,
       CASE WHEN merged AND s.longitude IS NOT NULL THEN state_order(s.ts, s.message_hash) END
FROM device_state AS s
LEFT JOIN messages AS m ON m.id = s.message_id AND m.stream = s.stream
                       AND m.message_hash = s.message_hash,
LATERAL (SELECT m.id IS NOT NULL AND (s.payload IS DISTINCT FROM m.payload
                                      OR s.latitude IS DISTINCT FROM m.latitude
                                      OR s.longitude IS DISTINCT FROM m.longitude) AS merged) AS x,
LATERAL (SELECT x.merged OR m.id IS NULL AS own) AS y;

DROP TRIGGER IF EXISTS messages_after_insert ON messages;
DROP FUNCTION after_messages_insert();
DROP AGGREGATE jsonb_merge(jsonb);
DROP TABLE device_state;

CREATE VIEW device_state AS
SELECT d.stream, d.ident,
       coalesce(d.message_id, m.id) AS message_id,
       d.ts,
       coalesce(d.received_at, m.received_at) AS received_at,
       CASE WHEN d.payload IS NULL THEN m.latitude ELSE d.latitude END AS latitude,
       CASE WHEN d.payload IS NULL THEN m.longitude ELSE d.longitude END AS longitude,
       coalesce(d.payload, m.payload) AS payload,
       d.message_hash, d.updated_at
FROM device_latest AS d
LEFT JOIN messages AS m
  ON m.stream = d.stream AND m.partition_ts = d.partition_ts AND m.message_hash = d.message_hash;

CREATE TRIGGER messages_keep_device_state
    AFTER INSERT ON messages
    FOR EACH ROW
    WHEN (current_setting('flespi_receiver.writer', true) IS DISTINCT FROM 'receiver'
          AND NEW.ident IS NOT NULL)
    EXECUTE FUNCTION keep_device_state_of_row();

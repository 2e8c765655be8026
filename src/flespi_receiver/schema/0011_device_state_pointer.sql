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
    -- merge mode: state_order() of the message a parameter's value came from, for the parameters
    -- whose value did not come from the latest message (most often none), and a digest of the
    -- payload's keys (parameter_keys())
    parameter_orders jsonb,
    parameter_keys   bytea,
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

-- A digest of a payload's keys: SHA-256 of the keys sorted bytewise, each written as its length
-- in characters, a colon and itself. The receiver computes the same (device_state.py), so that
-- a batch with the same parameters as the state is merged without reading the state's payload.
CREATE FUNCTION parameter_keys(payload jsonb) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN sha256(convert_to(coalesce(
    (SELECT string_agg(length(key) || ':' || key, '' ORDER BY key COLLATE "C")
     FROM jsonb_object_keys(payload) AS key), ''), 'UTF8'));

-- Merge mode, parameter by parameter: `payload` with its orders (`orders`, and `latest` for the
-- parameters not in it) and `later` with its own (`later_orders`, `later_latest`); each
-- parameter takes the value of the later order. Returns {"payload": ..., "orders": ...}, the
-- orders kept only where they differ from the later of `latest` and `later_latest`.
CREATE FUNCTION merge_parameters(payload jsonb, orders jsonb, latest text, later jsonb,
                                 later_orders jsonb, later_latest text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT jsonb_build_object(
            'payload', coalesce(jsonb_object_agg(key, CASE WHEN won THEN later -> key
                                                           ELSE payload -> key END), '{}'),
            'orders', coalesce(jsonb_object_agg(key, o) FILTER (
                WHERE o <> greatest(latest, later_latest)), '{}'))
        FROM (SELECT key, won, CASE WHEN won THEN later_o ELSE o END AS o
              FROM (SELECT key, o, later_o, later_o IS NOT NULL AND (o IS NULL OR later_o > o) AS won
                    FROM (SELECT key,
                                 CASE WHEN payload ? key THEN coalesce(orders ->> key, latest) END
                                     AS o,
                                 CASE WHEN later ? key
                                      THEN coalesce(later_orders ->> key, later_latest) END
                                     AS later_o
                          FROM (SELECT jsonb_object_keys(payload)
                                UNION SELECT jsonb_object_keys(later)) AS k(key)) AS a) AS b)
               AS c);

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
-- keep_latest). Per device: the batch's latest message, the earliest order among the batch's
-- parameters (p_oldest), the batch folded (p_payloads: every parameter's last value, NULL
-- when that is the latest message's payload, which is then read if needed;
-- p_orders: the orders that differ from the batch's latest message's; p_keys:
-- parameter_keys() of p_payloads) and the last position with its orders. When the whole batch
-- is later than the state and has the same parameters, which is the usual case, the batch's
-- fold is the new state as it is. Everything is computed on the locked row, so that two
-- receivers updating one device at once both count. Returns how many states changed.
CREATE FUNCTION keep_merged(p_stream text, p_idents text[], p_ts timestamptz[], p_hashes bytea[],
                            p_partition_ts timestamptz[], p_oldest text[], p_payloads jsonb[],
                            p_orders jsonb[], p_keys bytea[], p_latitudes float8[],
                            p_latitude_orders text[], p_longitudes float8[],
                            p_longitude_orders text[]) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    changed integer := 0;
    n integer;
BEGIN
    -- the first pass merges into the states that are kept in merge mode (all of them, usually);
    -- the second one, if needed, after making the missing ones
    FOR pass IN 1..2 LOOP
        IF pass = 2 THEN
            INSERT INTO device_latest (stream, ident, message_hash, partition_ts, payload,
                                       parameter_orders)
            SELECT p_stream, i.ident, '\x', '-infinity', '{}', '{}'
            FROM unnest(p_idents) AS i(ident)
            ON CONFLICT (stream, ident) DO NOTHING;
            -- a state kept in latest mode (or frozen): every parameter from its latest message
            UPDATE device_latest AS s
            SET payload = b.payload, latitude = b.latitude, longitude = b.longitude,
                parameter_orders = '{}',
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
        SET ts = CASE WHEN i.newest > state_order(s.ts, s.message_hash) THEN i.ts ELSE s.ts END,
            message_hash = CASE WHEN i.newest > state_order(s.ts, s.message_hash)
                                THEN i.message_hash ELSE s.message_hash END,
            partition_ts = CASE WHEN i.newest > state_order(s.ts, s.message_hash)
                                THEN i.partition_ts ELSE s.partition_ts END,
            message_id = CASE WHEN i.newest > state_order(s.ts, s.message_hash)
                              THEN NULL ELSE s.message_id END,
            received_at = CASE WHEN i.newest > state_order(s.ts, s.message_hash)
                               THEN NULL ELSE s.received_at END,
            (payload, parameter_orders, parameter_keys) = (
                -- NULL: the merged payload is the latest message's own, shown from messages
                SELECT CASE WHEN fast AND i.orders = '{}' THEN NULL
                            WHEN fast THEN i.payload ELSE merged -> 'payload' END,
                       CASE WHEN fast THEN i.orders ELSE merged -> 'orders' END,
                       CASE WHEN fast OR i.keys = s.parameter_keys THEN i.keys
                            ELSE parameter_keys(merged -> 'payload') END
                FROM (SELECT i.oldest > state_order(s.ts, s.message_hash)
                             AND coalesce(i.keys = s.parameter_keys, false) AS fast) AS f,
                LATERAL (SELECT CASE WHEN NOT fast THEN
                             merge_parameters(
                                 coalesce(s.payload,
                                          (SELECT m.payload FROM messages AS m
                                           WHERE m.stream = s.stream
                                             AND m.partition_ts = s.partition_ts
                                             AND m.message_hash = s.message_hash), '{}'),
                                 s.parameter_orders, state_order(s.ts, s.message_hash),
                                 i.payload, i.orders, i.newest) END AS merged) AS g),
            latitude = CASE WHEN i.latitude_order > coalesce(s.latitude_order, '')
                            THEN i.latitude ELSE s.latitude END,
            latitude_order = greatest(i.latitude_order, s.latitude_order),
            longitude = CASE WHEN i.longitude_order > coalesce(s.longitude_order, '')
                             THEN i.longitude ELSE s.longitude END,
            longitude_order = greatest(i.longitude_order, s.longitude_order),
            updated_at = now()
        FROM (SELECT u.ident, u.ts, u.message_hash, u.oldest, u.orders, u.keys, u.latitude,
                     u.latitude_order, u.longitude, u.longitude_order,
                     coalesce(u.given_partition_ts, u.ts) AS partition_ts,
                     state_order(u.ts, u.message_hash) AS newest,
                     -- NULL: the batch's latest message's own, stored by now
                     coalesce(u.payload,
                              (SELECT m.payload FROM messages AS m
                               WHERE m.stream = p_stream
                                 AND m.partition_ts = coalesce(u.given_partition_ts, u.ts)
                                 AND m.message_hash = u.message_hash)) AS payload
              FROM unnest(p_idents, p_ts, p_hashes, p_partition_ts, p_oldest, p_payloads,
                          p_orders, p_keys, p_latitudes, p_latitude_orders, p_longitudes,
                          p_longitude_orders)
                   AS u(ident, ts, message_hash, given_partition_ts, oldest, payload, orders,
                        keys, latitude, latitude_order, longitude, longitude_order)) AS i
        WHERE s.stream = p_stream AND s.ident = i.ident AND s.parameter_orders IS NOT NULL
          -- only when something changes: a message sent again changes nothing
          AND (i.oldest > state_order(s.ts, s.message_hash)
               OR i.latitude_order > coalesce(s.latitude_order, '')
               OR i.longitude_order > coalesce(s.longitude_order, '')
               OR EXISTS (SELECT
                          FROM (SELECT coalesce(s.payload,
                                                (SELECT m.payload FROM messages AS m
                                                 WHERE m.stream = s.stream
                                                   AND m.partition_ts = s.partition_ts
                                                   AND m.message_hash = s.message_hash))
                                           AS payload) AS state,
                               jsonb_object_keys(i.payload) AS k(key)
                          WHERE coalesce(i.orders ->> k.key, i.newest)
                                > CASE WHEN state.payload ? k.key
                                       THEN coalesce(s.parameter_orders ->> k.key,
                                                     state_order(s.ts, s.message_hash))
                                       ELSE '' END))
          -- a state whose payload is its latest message's, which another receiver stored
          -- after this statement began, is merged by the next pass, which sees that message
          AND (pass = 2 OR s.payload IS NOT NULL
               OR (i.oldest > state_order(s.ts, s.message_hash)
                   AND coalesce(i.keys = s.parameter_keys, false))
               OR EXISTS (SELECT FROM messages AS m
                          WHERE m.stream = s.stream AND m.partition_ts = s.partition_ts
                            AND m.message_hash = s.message_hash));
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
                            ARRAY['{}'::jsonb],
                            ARRAY[parameter_keys(CASE WHEN jsonb_typeof(NEW.payload) = 'object'
                                                      THEN NEW.payload ELSE '{}' END)],
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
-- mode) keeps its own values, every parameter at the order of that message.
INSERT INTO device_latest (stream, ident, ts, message_hash, partition_ts, updated_at, payload,
                           latitude, longitude, message_id, received_at, parameter_orders,
                           parameter_keys, latitude_order, longitude_order)
SELECT s.stream, s.ident, s.ts, s.message_hash,
       coalesce(m.partition_ts, s.ts, '2000-01-01 00:00:00+00'), s.updated_at,
       CASE WHEN own THEN s.payload END, CASE WHEN own THEN s.latitude END,
       CASE WHEN own THEN s.longitude END,
       CASE WHEN m.id IS NULL THEN s.message_id END, CASE WHEN m.id IS NULL THEN s.received_at END,
       CASE WHEN merged THEN '{}'::jsonb END, CASE WHEN merged THEN parameter_keys(s.payload) END,
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
       -- merge mode keeps the latest known position itself
       CASE WHEN d.payload IS NULL AND d.parameter_orders IS NULL THEN m.latitude
            ELSE d.latitude END AS latitude,
       CASE WHEN d.payload IS NULL AND d.parameter_orders IS NULL THEN m.longitude
            ELSE d.longitude END AS longitude,
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

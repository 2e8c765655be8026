-- Merge mode, as latest mode in 0014_latest_reads_its_arguments.sql, reads its arguments as the
-- receiver sends them (each column one JSON array, the identities and the parameters' digests
-- side by side in one bytea each): the receiver's call made an array of each of the twelve
-- first. (A first UPDATE that moved the states only moving to their latest message took the
-- statement for 1000 devices from 12.9 to 9.8 ms; it is not kept: two receivers storing one
-- device at once could end with a payload other than the merge of its messages.)
-- keep_merged() is otherwise as 0012_merge_new_devices.sql made it; keep_merged() on arrays
-- stays as 0012 made it, for the trigger's one-row calls, the batches PostgreSQL folds itself,
-- and receivers of the previous version while they are being upgraded.

-- the batch's fold of each device, a row each, from keep_merged()'s arguments: the n-th element
-- of each JSON array, the n-th 16 bytes of the identities and 32 of the digests
CREATE FUNCTION batch_merged(p_idents json, p_times json, p_hashes bytea,
                             p_partition_times json, p_oldest json, p_payloads json,
                             p_orders json, p_keys bytea, p_latitudes json,
                             p_latitude_orders json, p_longitudes json,
                             p_longitude_orders json)
RETURNS TABLE (ident text, ts timestamptz, message_hash bytea, given_partition_ts timestamptz,
               oldest text, payload jsonb, orders jsonb, keys bytea, latitude float8,
               latitude_order text, longitude float8, longitude_order text)
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT d.ident, time_of_usecs(d.usecs::bigint),
           substring(p_hashes FROM (d.n::integer - 1) * 16 + 1 FOR 16),
           time_of_usecs(d.partition_usecs::bigint), d.oldest, d.payload::jsonb,
           d.orders::jsonb, substring(p_keys FROM (d.n::integer - 1) * 32 + 1 FOR 32),
           d.latitude::float8, d.latitude_order, d.longitude::float8, d.longitude_order
    FROM ROWS FROM (json_array_elements_text(p_idents), json_array_elements_text(p_times),
                    json_array_elements_text(p_partition_times),
                    json_array_elements_text(p_oldest), json_array_elements_text(p_payloads),
                    json_array_elements_text(p_orders), json_array_elements_text(p_latitudes),
                    json_array_elements_text(p_latitude_orders),
                    json_array_elements_text(p_longitudes),
                    json_array_elements_text(p_longitude_orders))
         WITH ORDINALITY AS d(ident, usecs, partition_usecs, oldest, payload, orders, latitude,
                              latitude_order, longitude, longitude_order, n);
END;

CREATE FUNCTION keep_merged(p_stream text, p_idents json, p_times json, p_hashes bytea,
                            p_partition_times json, p_oldest json, p_payloads json,
                            p_orders json, p_keys bytea, p_latitudes json,
                            p_latitude_orders json, p_longitudes json,
                            p_longitude_orders json) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    changed integer := 0;
    n integer;
BEGIN
    -- the first pass merges into the states that are kept in merge mode (all of them, usually);
    -- the second one, if needed, after making the missing ones
    FOR pass IN 1..2 LOOP
        IF pass = 2 THEN
            -- a device seen for the first time: the batch's fold is its state as it is (the
            -- same as merging it into an empty state, without merging parameter by parameter)
            INSERT INTO device_latest (stream, ident, ts, message_hash, partition_ts, payload,
                                       parameter_orders, parameter_keys, latitude,
                                       latitude_order, longitude, longitude_order)
            SELECT p_stream, u.ident, u.ts, u.message_hash,
                   coalesce(u.given_partition_ts, u.ts),
                   -- NULL: the latest message's own payload, shown from messages
                   CASE WHEN u.orders <> '{}' THEN
                       coalesce(u.payload,
                                (SELECT m.payload FROM messages AS m
                                 WHERE m.stream = p_stream
                                   AND m.partition_ts = coalesce(u.given_partition_ts, u.ts)
                                   AND m.message_hash = u.message_hash)) END,
                   u.orders, u.keys, u.latitude, u.latitude_order, u.longitude,
                   u.longitude_order
            FROM batch_merged(p_idents, p_times, p_hashes, p_partition_times, p_oldest, p_payloads,
                              p_orders, p_keys, p_latitudes, p_latitude_orders, p_longitudes,
                              p_longitude_orders) AS u
            ON CONFLICT (stream, ident) DO NOTHING;
            GET DIAGNOSTICS n = ROW_COUNT;
            changed := changed + n;
            -- every device was merged by the first pass or is new (a new fleet, a new database)
            EXIT WHEN changed = json_array_length(p_idents);
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
                  WHERE d.stream = p_stream AND d.ident IN (SELECT json_array_elements_text(p_idents))
                    AND d.parameter_orders IS NULL) AS b
            WHERE s.stream = b.stream AND s.ident = b.ident AND s.parameter_orders IS NULL;
        END IF;

        UPDATE device_latest AS s
        SET (ts, message_hash, partition_ts, message_id, received_at, payload, parameter_orders,
             parameter_keys) = (
                SELECT CASE WHEN later THEN i.ts ELSE s.ts END,
                       CASE WHEN later THEN i.message_hash ELSE s.message_hash END,
                       CASE WHEN later THEN i.partition_ts ELSE s.partition_ts END,
                       CASE WHEN later THEN NULL ELSE s.message_id END,
                       CASE WHEN later THEN NULL ELSE s.received_at END,
                       -- NULL: the merged payload is the latest message's own, shown from
                       -- messages
                       CASE WHEN fast AND i.orders = '{}' THEN NULL
                            WHEN fast THEN i.payload ELSE merged -> 'payload' END,
                       CASE WHEN fast THEN i.orders ELSE merged -> 'orders' END,
                       CASE WHEN fast OR i.keys = s.parameter_keys THEN i.keys
                            ELSE parameter_keys(merged -> 'payload') END
                -- OFFSET 0: each computed once a row, not again at each use (an order is
                -- about a microsecond)
                FROM (SELECT o.newest > o.state AS later,
                             i.oldest > o.state AND coalesce(i.keys = s.parameter_keys, false)
                                 AS fast,
                             o.state, o.newest
                      FROM (SELECT state_order(s.ts, s.message_hash) AS state,
                                   state_order(i.ts, i.message_hash) AS newest OFFSET 0) AS o
                      OFFSET 0) AS f,
                LATERAL (SELECT CASE WHEN NOT fast THEN
                             merge_parameters(
                                 coalesce(s.payload,
                                          (SELECT m.payload FROM messages AS m
                                           WHERE m.stream = s.stream
                                             AND m.partition_ts = s.partition_ts
                                             AND m.message_hash = s.message_hash), '{}'),
                                 s.parameter_orders, f.state, i.payload, i.orders, f.newest)
                             END AS merged OFFSET 0) AS g),
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
              FROM batch_merged(p_idents, p_times, p_hashes, p_partition_times, p_oldest, p_payloads,
                                p_orders, p_keys, p_latitudes, p_latitude_orders, p_longitudes,
                                p_longitude_orders) AS u) AS i
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
        EXIT WHEN changed = json_array_length(p_idents);
    END LOOP;
    RETURN changed;
END
$$;

-- The receiver's call for a batch: keep_merged() with its statements planned at each call
-- (plan_cache_mode), about 0.3 ms. PostgreSQL keeps a function's plan once it has run a few
-- times, and a plan made while device_latest was empty (a new database, a TRUNCATE) read every
-- state for each device of the batch: for 1000 devices, a second a batch, until the table was
-- next analyzed. The trigger's one-row calls keep their plans (planning would double a row's
-- cost, and a row is one device).
CREATE FUNCTION keep_batch_merged(p_stream text, p_idents json, p_times json, p_hashes bytea,
                                  p_partition_times json, p_oldest json, p_payloads json,
                                  p_orders json, p_keys bytea, p_latitudes json,
                                  p_latitude_orders json, p_longitudes json,
                                  p_longitude_orders json)
RETURNS integer
LANGUAGE sql SET plan_cache_mode = force_custom_plan SET search_path FROM CURRENT
RETURN keep_merged(p_stream, p_idents, p_times, p_hashes, p_partition_times, p_oldest, p_payloads,
    p_orders, p_keys, p_latitudes, p_latitude_orders, p_longitudes, p_longitude_orders);

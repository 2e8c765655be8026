-- Latest mode reads its arguments as the receiver sends them: each column one JSON array
-- (times in microseconds since 2000-01-01 UTC, null: none), the identities side by side in one
-- bytea, read row by row where the statements use them. The receiver's call made an array of
-- each first (an ARRAY sub-select per column, then unnest()): reading them took 1.8 ms of
-- PostgreSQL's time for 1000 devices, now 0.8 (the whole statement, the previous function and
-- this one alternating in one session, every device moving: 7.3 -> 6.6 ms). keep_latest() on
-- arrays stays as 0013_latest_new_devices.sql made it, for the trigger's one-row calls (its
-- arrays cost nothing to make there), the batches PostgreSQL folds itself, and receivers of the
-- previous version while they are being upgraded.

-- the time `usecs` microseconds after 2000-01-01 UTC, exactly (whole seconds and microseconds
-- apart: an interval times a number is a double), whatever the session's time zone. STABLE as
-- timestamptz + interval is, so that PostgreSQL writes it out where it is used (an IMMUTABLE
-- function with a STABLE body is called instead, some 10 µs a call)
CREATE FUNCTION time_of_usecs(usecs bigint) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
RETURN timestamptz '2000-01-01 00:00:00+00' + (usecs / 1000000) * interval '1 second'
       + (usecs % 1000000) * interval '1 microsecond';

-- the batch's latest message of each device, a row each, from keep_latest()'s arguments: the
-- n-th element of each JSON array and the n-th 16 bytes of the identities; the partition time
-- is the time where the receiver sent none (p_partition_times NULL: none at all)
CREATE FUNCTION batch_latest(p_idents json, p_times json, p_hashes bytea,
                             p_partition_times json)
RETURNS TABLE (ident text, ts timestamptz, message_hash bytea, partition_ts timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT d.ident, time_of_usecs(d.usecs::bigint),
           substring(p_hashes FROM (d.n::integer - 1) * 16 + 1 FOR 16),
           time_of_usecs(coalesce(d.partition_usecs, d.usecs)::bigint)
    FROM ROWS FROM (json_array_elements_text(p_idents), json_array_elements_text(p_times),
                    json_array_elements_text(p_partition_times))
         WITH ORDINALITY AS d(ident, usecs, partition_usecs, n);
END;

CREATE FUNCTION keep_latest(p_stream text, p_idents json, p_times json, p_hashes bytea,
                            p_partition_times json)
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    moved integer;
    made integer;
BEGIN
    UPDATE device_latest AS s
    SET ts = i.ts, message_hash = i.message_hash, partition_ts = i.partition_ts,
        updated_at = now(), payload = NULL, latitude = NULL, longitude = NULL,
        message_id = NULL, received_at = NULL, parameter_orders = NULL, latitude_order = NULL,
        longitude_order = NULL
    FROM batch_latest(p_idents, p_times, p_hashes, p_partition_times) AS i
    WHERE s.stream = p_stream AND s.ident = i.ident
      AND is_later(i.ts, i.message_hash, s.ts, s.message_hash);
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved = json_array_length(p_idents) THEN
        RETURN moved;
    END IF;
    -- the others: devices seen for the first time, states already as late (left out here
    -- unlocked) and states another receiver made or moved meanwhile, which this statement
    -- sees and ON CONFLICT settles
    INSERT INTO device_latest AS s (stream, ident, ts, message_hash, partition_ts)
    SELECT p_stream, i.ident, i.ts, i.message_hash, i.partition_ts
    FROM batch_latest(p_idents, p_times, p_hashes, p_partition_times) AS i
    WHERE NOT EXISTS (SELECT FROM device_latest AS d
                      WHERE d.stream = p_stream AND d.ident = i.ident
                        AND NOT is_later(i.ts, i.message_hash, d.ts, d.message_hash))
    ON CONFLICT (stream, ident) DO UPDATE
    SET ts = excluded.ts, message_hash = excluded.message_hash,
        partition_ts = excluded.partition_ts, updated_at = now(), payload = NULL,
        latitude = NULL, longitude = NULL, message_id = NULL, received_at = NULL,
        parameter_orders = NULL, latitude_order = NULL, longitude_order = NULL
    WHERE is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash);
    GET DIAGNOSTICS made = ROW_COUNT;
    RETURN moved + made;
END
$$;

-- The receiver's call for a batch: keep_latest() with its statements planned at each call
-- (plan_cache_mode), about 0.3 ms. PostgreSQL keeps a function's plan once it has run a few
-- times, and a plan made while device_latest was empty (a new database, a TRUNCATE) read every
-- state for each device of the batch: for 1000 devices, a second a batch, until the table was
-- next analyzed. The trigger's one-row calls keep their plans (planning would double a row's
-- cost, and a row is one device).
CREATE FUNCTION keep_batch_latest(p_stream text, p_idents json, p_times json, p_hashes bytea,
                                  p_partition_times json)
RETURNS integer
LANGUAGE sql SET plan_cache_mode = force_custom_plan SET search_path FROM CURRENT
RETURN keep_latest(p_stream, p_idents, p_times, p_hashes, p_partition_times);

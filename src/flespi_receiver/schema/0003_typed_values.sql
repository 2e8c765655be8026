-- Best-effort conversions of a message parameter (a jsonb value) to a typed value: anything
-- that does not fit gives NULL, never an error. IMMUTABLE, so they can back expression
-- indexes; used by the messages_typed view ([[columns]] in the configuration).

CREATE FUNCTION json_text(value jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE jsonb_typeof(value) WHEN 'string' THEN value #>> '{}'
                                WHEN 'number' THEN value::text
                                WHEN 'boolean' THEN value::text END;

CREATE FUNCTION json_float(value jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(value) = 'number' THEN
    CASE WHEN value::numeric = 0 OR abs(value::numeric) BETWEEN 1e-300 AND 1e300
         THEN value::numeric::double precision END
END;

CREATE FUNCTION json_bigint(value jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(value) = 'number' THEN
    CASE WHEN value::numeric = trunc(value::numeric)
              AND value::numeric BETWEEN -9223372036854775808 AND 9223372036854775807
         THEN value::numeric::bigint END
END;

CREATE FUNCTION json_boolean(value jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE jsonb_typeof(value) WHEN 'boolean' THEN value::boolean
                                WHEN 'number' THEN value::numeric <> 0 END;

-- seconds since the epoch, for 1900-01-01 .. 9999-12-31
CREATE FUNCTION json_epoch(value jsonb) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(value) = 'number' THEN
    CASE WHEN value::numeric BETWEEN -2208988800 AND 253402300799
         THEN to_timestamp(value::numeric::double precision) END
END;

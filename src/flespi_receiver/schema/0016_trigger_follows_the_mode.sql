-- The trigger that keeps device_state for other sessions' inserts (psql, a backfill script)
-- keeps it in the mode the receiver runs with: `serve` and `migrate` give it 'merge' or 'latest'
-- as its argument (trigger.py), and a session's own flespi_receiver.device_state_merge still
-- decides when it is set. A session that set nothing kept latest mode: in a database kept in
-- merge mode, one row inserted by hand made its device's state that row alone, and the values
-- the state held were gone. And a session whose transaction had set flespi_receiver.device_state
-- locally read '' afterwards, which turned the state off for its later rows.
-- keep_device_state_of_row() is otherwise as 0011_device_state_pointer.sql made it.
CREATE OR REPLACE FUNCTION keep_device_state_of_row() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    o text := state_order(NEW.ts, NEW.message_hash);
BEGIN
    -- '' is what a setting reads as once a transaction that set it locally has ended: unset
    IF coalesce(nullif(current_setting('flespi_receiver.device_state', true), ''), 'on') <> 'on'
    THEN
        RETURN NULL;
    END IF;
    -- the session's own setting, else the mode the receiver runs with (the trigger's argument)
    IF coalesce(nullif(current_setting('flespi_receiver.device_state_merge', true), ''),
                CASE WHEN TG_NARGS > 0 AND TG_ARGV[0] = 'merge' THEN 'on' END) = 'on' THEN
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

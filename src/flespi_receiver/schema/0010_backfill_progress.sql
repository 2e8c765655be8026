-- How far `flespi-receiver backfill` got, per stream, device and requested range: updated in
-- the transaction of each page it stores, so a run that was killed resumes at its last page.
CREATE TABLE backfill_progress (
    stream     text             NOT NULL,
    device_id  bigint           NOT NULL,  -- flespi's device id
    range_from timestamptz      NOT NULL,  -- the range asked for (--from, --to)
    range_to   timestamptz      NOT NULL,
    next_from  double precision NOT NULL,  -- Unix seconds: where the next page starts
    done       boolean          NOT NULL DEFAULT false,
    pages      bigint           NOT NULL DEFAULT 0,
    fetched    bigint           NOT NULL DEFAULT 0,
    stored     bigint           NOT NULL DEFAULT 0,
    rejected   bigint           NOT NULL DEFAULT 0,
    started_at timestamptz      NOT NULL DEFAULT now(),
    updated_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, device_id, range_from, range_to)
);

-- outboxd: the default outbox table, publication and slot, as `outboxd migrate` creates them
-- with the default configuration (table public.outbox, publication and slot `outboxd`).
-- Prefer `outboxd migrate`: it quotes configured names and never recreates what exists.
-- The table shape is Debezium-compatible: a service that feeds Debezium's outbox router can
-- switch to outboxd without changing its INSERTs.

CREATE TABLE IF NOT EXISTS public.outbox (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb,
    headers       jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Where poison events go when even the dead-letter topic refuses them.
CREATE TABLE IF NOT EXISTS public.outboxd_dead_letter (
    seq              bigserial   PRIMARY KEY,
    event_id         text,
    topic            text        NOT NULL,
    key              text,
    payload          bytea,
    headers          jsonb,
    reason           text        NOT NULL,
    error            text,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);

-- What `outboxd dead-letters redrive` republished: one row per dead letter, so a second run
-- redrives nothing twice.
CREATE TABLE IF NOT EXISTS public.outboxd_redriven (
    source      text        NOT NULL,
    position    text        NOT NULL,
    event_id    text,
    topic       text        NOT NULL,
    redriven_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, position)
);

-- Table-less events: SELECT outbox_emit('order', '42', 'OrderPlaced', '{"total": 10}');
-- writes a transactional logical decoding message instead of a row; it is relayed like a row
-- (same topic, key, headers, order and guarantee) and leaves nothing to delete.
CREATE OR REPLACE FUNCTION public.outbox_emit(
    aggregatetype text, aggregateid text, type text, payload jsonb, headers jsonb DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    event_id uuid := gen_random_uuid();
BEGIN
    PERFORM pg_logical_emit_message(true, 'outbox', json_build_object(
        'id', event_id, 'aggregatetype', aggregatetype, 'aggregateid', aggregateid,
        'type', type, 'payload', payload, 'headers', headers)::text);
    RETURN event_id;
END
$fn$;

-- Only INSERTs are relayed; the service may delete published rows at will. A partitioned
-- outbox (say, a partition a month) must be published under its own name, not each
-- partition's: outboxd refuses a publication without publish_via_partition_root.
CREATE PUBLICATION outboxd FOR TABLE public.outbox
    WITH (publish = 'insert', publish_via_partition_root = true);

-- Needs wal_level = logical. Creating a slot waits for running transactions to finish.
SELECT pg_create_logical_replication_slot('outboxd', 'pgoutput');

-- Writing an event, in the same transaction as the state change:
--   INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload, headers)
--   VALUES ('order', '42', 'OrderPlaced', '{"total": 10}', '{"traceparent": "00-…"}');

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

-- Only INSERTs are relayed; the service may delete published rows at will.
CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');

-- Needs wal_level = logical. Creating a slot waits for running transactions to finish.
SELECT pg_create_logical_replication_slot('outboxd', 'pgoutput');

-- Writing an event, in the same transaction as the state change:
--   INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload, headers)
--   VALUES ('order', '42', 'OrderPlaced', '{"total": 10}', '{"traceparent": "00-…"}');

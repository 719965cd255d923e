-- nudge schema version 1: the events table backends write to, its wake-up trigger and nudge.publish().
-- Applied by `nudge migrate` (and `nudge serve` at start); can also be applied by hand with
--   psql -v ON_ERROR_STOP=1 -1 -f sql/0001_events.sql
-- The file records itself in nudge.schema_migrations, so nudge never applies it twice.

CREATE SCHEMA IF NOT EXISTS nudge;

CREATE TABLE IF NOT EXISTS nudge.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE nudge.events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text NOT NULL,
    kind         text NOT NULL,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    recipients   text[] NULL,
    data         jsonb NOT NULL DEFAULT '{}',
    -- nudge's bookkeeping: set in the transaction that claims the row. Backends never set it.
    processed_at timestamptz NULL,

    CONSTRAINT events_topic_format CHECK (topic ~ '^[^[:space:]]{1,200}$'),
    CONSTRAINT events_kind_length CHECK (char_length(kind) BETWEEN 1 AND 100),
    CONSTRAINT events_data_object CHECK (jsonb_typeof(data) = 'object'),
    CONSTRAINT events_data_size CHECK (octet_length(data::text) <= 4096),
    CONSTRAINT events_recipients_not_empty CHECK (recipients IS NULL OR cardinality(recipients) > 0),
    CONSTRAINT events_recipients_valid CHECK (
        recipients IS NULL OR (array_position(recipients, NULL) IS NULL AND array_position(recipients, '') IS NULL)
    )
);

-- The claim query walks pending rows in id order; this index holds only those, so it stays tiny.
CREATE INDEX events_pending ON nudge.events (id) WHERE processed_at IS NULL;
-- Retention deletes processed rows by age.
CREATE INDEX events_processed_at ON nudge.events (processed_at) WHERE processed_at IS NOT NULL;

-- One notification per statement with a constant payload: PostgreSQL folds identical notifications within a
-- transaction, so a transaction inserting 10,000 rows (in one statement or many) wakes nudge once.
CREATE FUNCTION nudge.notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nudge', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON nudge.events
    FOR EACH STATEMENT EXECUTE FUNCTION nudge.notify_events();

CREATE FUNCTION nudge.publish(topic text, kind text, recipients text[] DEFAULT NULL, data jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE sql AS $$
    INSERT INTO nudge.events (topic, kind, recipients, data) VALUES ($1, $2, $3, coalesce($4, '{}'))
    RETURNING id
$$;

INSERT INTO nudge.schema_migrations (version, name) VALUES (1, 'events');

-- nudge schema version 6: every row a producer can write is deliverable, producers cannot write nudge's own
-- columns, and replays find one user's or one topic's events through indexes.
--
-- Why:
-- * `occurred_at` accepted 'infinity' and '-infinity', which no event frame can carry (`at` is an ISO time):
--   such a row stopped delivery for everyone. Now a CHECK refuses it. Pending rows that already have one can
--   never be delivered: they are marked processed without a seq, as expired rows are.
-- * `seq` and `processed_at` are written by nudge's claim only. A producer that set them (an
--   `INSERT ... SELECT *` copying old rows does) made its row look delivered, or moved every node's cursor past
--   all future events. An INSERT that sets either now fails, naming the column (SQLSTATE 428C9, as PostgreSQL's
--   own "cannot insert a non-DEFAULT value into column"). The trigger function runs only for such a row (its
--   WHEN clause is evaluated without calling it), so ordinary INSERTs pay nothing measurable.
-- * `resume` and a slow connection's catch-up read one user's personal events and one connection's topics' events
--   in a seq range. Without indexes of their own they walked every event in the range, all users' alike. Both
--   indexes are partial on numbered rows, so producers' INSERTs do not touch them; the claim adds each row once.
--   On a large table, building them blocks writes for as long as it takes: they can be built beforehand with
--   CREATE INDEX CONCURRENTLY and these exact names, and this file then skips them.
--
--   psql -v ON_ERROR_STOP=1 -1 -f sql/0006_safe_rows.sql

UPDATE nudge.events SET processed_at = now()
WHERE processed_at IS NULL AND NOT isfinite(occurred_at);

-- NOT VALID: processed rows kept for `resume` may still hold an infinite time (nudge skips them when read);
-- every row written from now on, by producers and by the claim, is checked.
ALTER TABLE nudge.events ADD CONSTRAINT events_occurred_at_finite CHECK (isfinite(occurred_at)) NOT VALID;

CREATE FUNCTION nudge.refuse_internal_columns() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    col text := CASE WHEN NEW.seq IS NOT NULL THEN 'seq' ELSE 'processed_at' END;
BEGIN
    RAISE EXCEPTION 'cannot insert a non-DEFAULT value into column "%" of nudge.events', col
        USING ERRCODE = '428C9', SCHEMA = 'nudge', TABLE = 'events', COLUMN = col,
              DETAIL = format('Column "%s" is written by nudge when it claims the row.', col),
              HINT = 'Insert topic, kind, recipients, data and (optionally) occurred_at only.';
END
$$;

CREATE TRIGGER events_internal_columns BEFORE INSERT ON nudge.events
    FOR EACH ROW WHEN (NEW.seq IS NOT NULL OR NEW.processed_at IS NOT NULL)
    EXECUTE FUNCTION nudge.refuse_internal_columns();

-- Personal events by recipient (`recipients @> ARRAY[user]`). fastupdate off: each claim pays its small,
-- even share instead of one claim now and then flushing a pending list.
CREATE INDEX IF NOT EXISTS events_recipients ON nudge.events USING gin (recipients)
    WITH (fastupdate = off) WHERE seq IS NOT NULL;
-- Topic events by topic, in seq order.
CREATE INDEX IF NOT EXISTS events_topic_seq ON nudge.events (topic, seq)
    WHERE seq IS NOT NULL AND recipients IS NULL;

INSERT INTO nudge.schema_migrations (version, name) VALUES (6, 'safe_rows');

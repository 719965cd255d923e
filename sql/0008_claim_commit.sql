-- nudge schema version 8: a seq is never handed out twice, even when PostgreSQL loses commits; claims may commit
-- asynchronously.
--
-- Why: a claim's commit is what makes its seq numbers final. A PostgreSQL that loses the tail of its WAL (a crash
-- with `synchronous_commit = off`, a failover to a standby that had not received it) forgets the claim while the
-- clients may already hold its seqs: the rows become pending again, and the next claim would give the same numbers
-- to other events, which a client resuming from one of those seqs would then never see.
--
-- So nudge.delivery now records which server start handed out last_seq (`pg_postmaster_start_time()`). The first
-- claim after PostgreSQL (re)started, or after a failover to another server, skips 1,000,000,000 numbers before it
-- takes its own: every seq it hands out is above any seq the lost commits can have handed out. Rows whose claim was
-- lost are claimed again with new, higher seqs; nothing a client holds is reused. seq stays strictly increasing;
-- it is no longer consecutive across a restart.
--
-- With gaps in the numbering, "the oldest seq still stored" no longer tells `resume` what the retention deleted:
-- nudge.retention now records it (`deleted_through`, kept by triggers on every DELETE and TRUNCATE, whoever runs
-- it).
--
-- And nudge.claim() takes a fourth argument: `commit_async` makes that claim's transaction commit with
-- `synchronous_commit = off` (NUDGE_CLAIM_COMMIT=async): the claim no longer waits for its WAL flush, at the price
-- of the redelivery above (same event id, new seq) of the events claimed in the last moments before a PostgreSQL
-- crash. The three-argument form stays, for nodes of the previous version during a rolling upgrade, and commits
-- durably as before.
--
--   psql -v ON_ERROR_STOP=1 -1 -f sql/0008_claim_commit.sql

ALTER TABLE nudge.delivery ADD COLUMN server_started timestamptz;
-- Filled now: a running database must not skip numbers at its first claim after this migration.
UPDATE nudge.delivery SET server_started = pg_postmaster_start_time();

-- One row: every seq up to deleted_through was deleted (after the retention, or by hand). A table of its own, not
-- a column of nudge.delivery, so that deleting never waits for a claim's row lock, nor a claim for a delete.
CREATE TABLE nudge.retention (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    deleted_through bigint NOT NULL
);
-- Until now the oldest stored seq told it: everything below it is gone; with nothing stored, everything is.
INSERT INTO nudge.retention (deleted_through)
SELECT coalesce((SELECT seq FROM nudge.events WHERE seq IS NOT NULL ORDER BY seq LIMIT 1) - 1, last_seq)
FROM nudge.delivery;

-- SECURITY DEFINER: whoever may delete events (nudge's runtime role, an operator) moves the mark without a right
-- to write it.
CREATE FUNCTION nudge.note_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE nudge.retention r SET deleted_through = gone.seq
    FROM (SELECT max(d.seq) AS seq FROM deleted_rows d) gone
    WHERE gone.seq > r.deleted_through;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION nudge.note_deleted() FROM PUBLIC;
CREATE TRIGGER events_deleted AFTER DELETE ON nudge.events
    REFERENCING OLD TABLE AS deleted_rows FOR EACH STATEMENT EXECUTE FUNCTION nudge.note_deleted();

-- A TRUNCATE deletes without a DELETE trigger seeing it: everything handed out so far is gone. Its lock keeps
-- every claim out meanwhile, so last_seq is the last seq the truncated rows can have had.
CREATE FUNCTION nudge.note_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE nudge.retention r SET deleted_through = d.last_seq
    FROM nudge.delivery d
    WHERE d.last_seq > r.deleted_through;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION nudge.note_truncated() FROM PUBLIC;
CREATE TRIGGER events_truncated AFTER TRUNCATE ON nudge.events
    FOR EACH STATEMENT EXECUTE FUNCTION nudge.note_truncated();

CREATE FUNCTION nudge.claim(batch bigint, max_age double precision, tell_others boolean, commit_async boolean)
RETURNS TABLE (seq bigint, id bigint, topic text, kind text, occurred_at text, recipients text[], data text)
LANGUAGE plpgsql
-- As version 5: the plan always goes through the primary key, without JIT.
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET jit = off
AS $$
#variable_conflict use_column
BEGIN
    IF commit_async THEN
        -- Local to this transaction (the claim's statement), and not in the function's SET list, so it lasts until
        -- the commit.
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN QUERY
    WITH next AS (
        SELECT id, occurred_at < now() - make_interval(secs => max_age) AS expired
        FROM nudge.events
        WHERE processed_at IS NULL
        ORDER BY id
        LIMIT batch
        FOR UPDATE SKIP LOCKED
    ), numbered AS (
        -- Window functions cannot share a query level with FOR UPDATE, hence a second step.
        SELECT id, CASE WHEN NOT expired THEN count(*) FILTER (WHERE NOT expired) OVER (ORDER BY id) END AS n
        FROM next
    ), counter AS (
        -- A server start other than the one that handed out last_seq may have lost claims: skip past them.
        UPDATE nudge.delivery
        SET last_seq = last_seq
                + CASE WHEN server_started IS DISTINCT FROM pg_postmaster_start_time() THEN 1000000000 ELSE 0 END
                + (SELECT count(n) FROM numbered),
            server_started = pg_postmaster_start_time()
        WHERE EXISTS (SELECT 1 FROM numbered WHERE n IS NOT NULL)
        RETURNING last_seq - (SELECT count(n) FROM numbered) AS base
    )
    UPDATE nudge.events e
    SET processed_at = now(), seq = (SELECT base FROM counter) + numbered.n
    FROM numbered
    WHERE e.id = numbered.id
    RETURNING e.seq, e.id, e.topic, e.kind,
        to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), e.recipients, e.data::text;
    IF tell_others AND FOUND THEN
        PERFORM pg_notify('nudge_claimed', (SELECT last_seq::text FROM nudge.delivery));
    END IF;
END
$$;

-- The previous signature: a durable claim.
CREATE OR REPLACE FUNCTION nudge.claim(batch bigint, max_age double precision, tell_others boolean)
RETURNS TABLE (seq bigint, id bigint, topic text, kind text, occurred_at text, recipients text[], data text)
LANGUAGE sql
AS $$ SELECT * FROM nudge.claim(batch, max_age, tell_others, false) $$;

-- Whoever could claim before (the runtime role of sql/roles.sql) can claim now, without waiting for roles.sql to
-- be run again, so that nodes of the previous version keep claiming through the upgrade; and nobody else. A
-- database without roles.sql keeps PostgreSQL's default (every role may execute a function).
DO $$
DECLARE
    old_acl aclitem[];
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT p.grantee FROM information_schema.column_privileges p
        WHERE p.table_schema = 'nudge' AND p.table_name = 'delivery' AND p.column_name = 'last_seq'
          AND p.privilege_type = 'UPDATE' AND p.grantee NOT IN ('PUBLIC', current_user)
    LOOP
        EXECUTE format('GRANT UPDATE (server_started) ON nudge.delivery TO %I', grantee);
    END LOOP;
    FOR grantee IN
        SELECT DISTINCT p.grantee FROM information_schema.table_privileges p
        WHERE p.table_schema = 'nudge' AND p.table_name = 'delivery' AND p.privilege_type = 'SELECT'
          AND p.grantee NOT IN ('PUBLIC', current_user)
    LOOP
        EXECUTE format('GRANT SELECT ON nudge.retention TO %I', grantee);
    END LOOP;
    SELECT proacl INTO old_acl FROM pg_proc WHERE oid = 'nudge.claim(bigint, double precision, boolean)'::regprocedure;
    IF old_acl IS NOT NULL THEN
        REVOKE ALL ON FUNCTION nudge.claim(bigint, double precision, boolean, boolean) FROM PUBLIC;
        FOR grantee IN
            SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
            FROM aclexplode(old_acl) a
            WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> a.grantor
        LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION nudge.claim(bigint, double precision, boolean, boolean) TO %s',
                grantee);
        END LOOP;
    END IF;
END
$$;

INSERT INTO nudge.schema_migrations (version, name) VALUES (8, 'claim_commit');

-- Least-privilege roles for nudge: what the role running `nudge serve --no-migrate` and your producers may do.
-- Not a migration (nudge never applies it): the owner runs it after `nudge migrate`, and again after each
-- upgrade (it is idempotent, and it takes away whatever these roles held before on nudge's schema).
--
--   psql "postgres://nudge_owner@db/app" -v runtime=nudge_runtime -v producer=nudge_producer -f sql/roles.sql
--
-- Three roles, created beforehand by whoever manages roles (this file only grants):
--
--   owner     runs `nudge migrate` and this file: owns schema nudge and everything in it. Needs CREATE on the
--             database for the first migration; never used by a running nudge.
--   runtime   -v runtime=NAME (default nudge_runtime): `nudge serve --no-migrate` and `nudge status`. Reads and
--             claims events, deletes them after the retention, keeps nudge.delivery and nudge.nodes, reads
--             nudge.schema_migrations. No DDL, no INSERT into nudge.events.
--   producer  -v producer=NAME (default nudge_producer): your backends, or a NOLOGIN group role your backends'
--             roles are members of (GRANT nudge_producer TO app). INSERT into nudge.events and
--             nudge.publish(); nothing else: it cannot read, update or delete events (its own included).
--
-- LISTEN, NOTIFY and advisory locks need no grant. nudge.publish() becomes SECURITY DEFINER (with a fixed
-- search_path), so that it can return the new event's id to a producer that may not read nudge.events; a
-- producer's own `INSERT ... RETURNING id` is refused for that reason (use nudge.publish() for the id).

\set ON_ERROR_STOP on
\set QUIET on
\if :{?runtime}
\else
    \set runtime nudge_runtime
\endif
\if :{?producer}
\else
    \set producer nudge_producer
\endif

SELECT set_config('nudge.runtime_role', :'runtime', false), set_config('nudge.producer_role', :'producer', false)
\g /dev/null

BEGIN;

-- Check everything first: a mistake here is an error before anything is granted.
DO $check$
DECLARE
    runtime  text := current_setting('nudge.runtime_role');
    producer text := current_setting('nudge.producer_role');
    owner    text;
    version  integer;
    r        text;
BEGIN
    SELECT nspowner::regrole::text INTO owner FROM pg_namespace WHERE nspname = 'nudge';
    IF owner IS NULL THEN
        RAISE EXCEPTION 'schema nudge does not exist: run `nudge migrate` (as the owner role) first';
    END IF;
    IF owner <> quote_ident(current_user) THEN
        RAISE EXCEPTION 'run roles.sql as the owner of schema nudge (%), not as %', owner, current_user
            USING HINT = 'The owner is the role that ran `nudge migrate`.';
    END IF;
    SELECT max(m.version) INTO version FROM nudge.schema_migrations m;
    IF version IS NULL OR version < 8 THEN
        RAISE EXCEPTION 'schema nudge is at version %, roles.sql needs 8 or later: run `nudge migrate` first',
            coalesce(version, 0);
    END IF;
    FOREACH r IN ARRAY ARRAY[runtime, producer] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            RAISE EXCEPTION 'role "%" does not exist', r
                USING HINT = format('Create it first, e.g. CREATE ROLE %I LOGIN PASSWORD ''...'' (or NOLOGIN for a '
                                    'group role others are members of).', r);
        END IF;
        IF r = current_user THEN
            RAISE EXCEPTION 'role "%" is the owner: nudge''s roles must differ from the owner and from each other', r;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r AND (rolsuper OR rolbypassrls)) THEN
            RAISE EXCEPTION 'role "%" is a superuser (or bypasses row security): no grant can restrict it', r;
        END IF;
        IF pg_has_role(r, current_user, 'MEMBER') THEN
            RAISE EXCEPTION 'role "%" is a member of the owner %, so it holds every right of the owner', r, current_user;
        END IF;
    END LOOP;
    IF runtime = producer THEN
        RAISE EXCEPTION 'the runtime and producer roles must differ (both are "%")', runtime;
    END IF;
END
$check$;

-- Start from nothing on schema nudge, then grant exactly what each role needs (one transaction: no moment
-- without the rights).
REVOKE ALL ON ALL TABLES IN SCHEMA nudge FROM :"runtime", :"producer";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA nudge FROM :"runtime", :"producer";
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA nudge FROM PUBLIC, :"runtime", :"producer";
REVOKE ALL ON SCHEMA nudge FROM :"runtime", :"producer";

GRANT USAGE ON SCHEMA nudge TO :"runtime", :"producer";

-- runtime: the claim (nudge.claim() runs with its caller's rights: it reads pending rows, locks them FOR UPDATE,
-- sets seq and processed_at, and takes numbers from nudge.delivery), deliveries and replays (SELECT), the
-- retention sweep (DELETE), heartbeats and `nudge status` (nudge.nodes), the `--no-migrate` check.
GRANT SELECT, DELETE, UPDATE (processed_at, seq) ON nudge.events TO :"runtime";
GRANT SELECT, UPDATE (last_seq, server_started) ON nudge.delivery TO :"runtime";
GRANT SELECT ON nudge.retention TO :"runtime";
GRANT SELECT, INSERT, UPDATE, DELETE ON nudge.nodes TO :"runtime";
GRANT SELECT ON nudge.schema_migrations TO :"runtime";
GRANT EXECUTE ON FUNCTION nudge.claim(bigint, double precision, boolean) TO :"runtime";
GRANT EXECUTE ON FUNCTION nudge.claim(bigint, double precision, boolean, boolean) TO :"runtime";
-- Presence (schema 7): each node writes its own rows; `nudge status` and operators read the status view.
GRANT SELECT, INSERT, UPDATE, DELETE ON nudge.presence_users, nudge.presence_topics TO :"runtime";
GRANT SELECT ON nudge.presence, nudge.topic_presence, nudge.status TO :"runtime";

-- producer: INSERT (the trigger events_internal_columns refuses seq and processed_at, SQLSTATE 428C9) and
-- nudge.publish(), which inserts as the owner and returns the id without the producer reading the table.
GRANT INSERT ON nudge.events TO :"producer";
ALTER FUNCTION nudge.publish(text, text, text[], jsonb) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
GRANT EXECUTE ON FUNCTION nudge.publish(text, text, text[], jsonb) TO :"producer";
-- Who is online, and control, and nothing more (schema 7).
GRANT SELECT ON nudge.presence, nudge.topic_presence TO :"producer";
GRANT EXECUTE ON FUNCTION nudge.is_online(text), nudge.disconnect(text, text), nudge.unsubscribe(text, text)
    TO :"producer";

-- Tables and sequences a later migration adds to schema nudge are nudge's own bookkeeping: the runtime may read
-- and write their rows (never their definitions) until this file, re-run after the upgrade, narrows that down.
ALTER DEFAULT PRIVILEGES IN SCHEMA nudge GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"runtime";
ALTER DEFAULT PRIVILEGES IN SCHEMA nudge GRANT USAGE, SELECT ON SEQUENCES TO :"runtime";

COMMIT;

\echo roles.sql: :runtime may run nudge serve --no-migrate and nudge status; :producer may insert events and call nudge.publish()

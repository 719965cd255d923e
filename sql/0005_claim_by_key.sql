-- nudge schema version 5: a claim costs the rows it claims, however many processed rows the table keeps.
--
-- Why: nudge.claim() (version 3) updates the rows it picked with `UPDATE ... FROM numbered WHERE e.id =
-- numbered.id`. PostgreSQL cannot estimate how many rows a CTE returns, and it planned that join by the table's
-- size: below a few hundred thousand rows a hash join over a sequential scan of the whole table (processed rows
-- included: they are kept for NUDGE_RETENTION, for `resume`), i.e. every claim read every row. With 100,000 rows
-- a 1,000-row claim took 47 ms, 34 of them in that scan; by primary key it takes about 20. Worse, a plan made
-- while the table was nearly empty (a session caches it) can stay a nested loop that scans the table once per
-- claimed row until the table is next analyzed: seconds per claim.
--
-- The function now runs with sequential scans, hash joins and merge joins disabled, settings that apply inside it
-- only (PostgreSQL restores the caller's on return). The one plan left is the intended one: pending rows through
-- events_pending, each claimed row updated through the primary key. A disabled plan type is priced out rather
-- than forbidden, which pushes the plan's estimated cost past the JIT thresholds: JIT is off in it too (with JIT,
-- a 5-row claim took 300 ms compiling). Its body, signature, result and locking are unchanged; nothing changes
-- for backends.
--
--   psql -v ON_ERROR_STOP=1 -1 -f sql/0005_claim_by_key.sql

ALTER FUNCTION nudge.claim(bigint, double precision, boolean)
    SET enable_seqscan = off
    SET enable_hashjoin = off
    SET enable_mergejoin = off
    SET jit = off;

INSERT INTO nudge.schema_migrations (version, name) VALUES (5, 'claim_by_key');

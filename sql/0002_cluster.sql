-- nudge schema version 2: several nodes on one database, one delivery order, catch-up after reconnect.
--
-- Claiming a row now also gives it a delivery sequence number (`seq`), taken from nudge.delivery while that row
-- is locked, i.e. in commit order: a claim that commits later always has larger numbers. Every node delivers the
-- claimed rows past its own cursor in seq order, so all nodes see one cluster-wide order, and a client can ask
-- for what it missed by seq (`resume`). Backends write events exactly as before; nothing changes for them.
--
--   psql -v ON_ERROR_STOP=1 -1 -f sql/0002_cluster.sql

ALTER TABLE nudge.events ADD COLUMN seq bigint;
-- Readers scan "seq > my cursor": unique, and the index they use.
CREATE UNIQUE INDEX events_seq ON nudge.events (seq) WHERE seq IS NOT NULL;

-- One row: the last seq handed out. Its row lock, held from the claim until its commit, is the cluster-wide lock
-- that makes seq order equal commit order.
CREATE TABLE nudge.delivery (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_seq  bigint NOT NULL
);
INSERT INTO nudge.delivery (last_seq) VALUES (0);

-- Live nodes, for `nudge status`: each node upserts its row every few seconds; rows not refreshed age out.
CREATE TABLE nudge.nodes (
    id           text PRIMARY KEY,
    address      text NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    connections  integer NOT NULL,
    cursor       bigint NOT NULL
);

INSERT INTO nudge.schema_migrations (version, name) VALUES (2, 'cluster');

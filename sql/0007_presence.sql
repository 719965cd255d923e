-- nudge schema version 7: who is online, as rows a backend can query, and control from SQL.
--
-- Each node writes, in batches (at most two statements every half second, and nothing while nothing changes),
-- which users have authenticated connections on it and to which topics those connections are subscribed. The
-- views join them with the nodes whose heartbeat is fresh, so a node that dies without a word drops out within
-- three heartbeat intervals (15 s). Backends read the views or call nudge.is_online(); they disconnect users or
-- drop subscriptions with nudge.disconnect() and nudge.unsubscribe(), which NOTIFY every node on commit (nothing
-- happens if the transaction rolls back).
--
--   psql -v ON_ERROR_STOP=1 -1 -f sql/0007_presence.sql

-- One row per (node, user) with at least one authenticated connection on that node.
CREATE TABLE nudge.presence_users (
    node_id     text NOT NULL,
    user_id     text NOT NULL,
    connections integer NOT NULL,
    since       timestamptz NOT NULL,
    PRIMARY KEY (node_id, user_id)
);
CREATE INDEX presence_users_user ON nudge.presence_users (user_id);

-- One row per (node, user, topic) with at least one connection of that user on that node subscribed to it.
CREATE TABLE nudge.presence_topics (
    node_id     text NOT NULL,
    user_id     text NOT NULL,
    topic       text NOT NULL,
    connections integer NOT NULL,
    PRIMARY KEY (node_id, user_id, topic)
);
CREATE INDEX presence_topics_topic ON nudge.presence_topics (topic);

-- A node counts while its heartbeat (every 5 s) is younger than three intervals. The views read the tables with
-- their owner's rights, so a role may be given SELECT on a view alone (sql/roles.sql does, for producers).
CREATE VIEW nudge.presence AS
SELECT p.user_id, sum(p.connections)::integer AS connections, count(*)::integer AS nodes, min(p.since) AS since
FROM nudge.presence_users p
WHERE p.node_id IN (SELECT id FROM nudge.nodes WHERE heartbeat_at >= now() - interval '15 seconds')
GROUP BY p.user_id;

CREATE VIEW nudge.topic_presence AS
SELECT t.topic, sum(t.connections)::integer AS connections, count(DISTINCT t.user_id)::integer AS users
FROM nudge.presence_topics t
WHERE t.node_id IN (SELECT id FROM nudge.nodes WHERE heartbeat_at >= now() - interval '15 seconds')
GROUP BY t.topic;

-- Cheap enough per row of a backend's query: one index lookup on presence_users_user, one on the nodes' key.
-- SECURITY DEFINER (fixed search_path) so that a role allowed to call it needs no right on the tables.
CREATE FUNCTION nudge.is_online(user_id text) RETURNS boolean LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (
        SELECT 1 FROM nudge.presence_users p JOIN nudge.nodes n ON n.id = p.node_id
        WHERE p.user_id = $1 AND n.heartbeat_at >= now() - interval '15 seconds'
    )
$$;

-- Every open connection of the user, on every node, gets {"type":"error","code":"revoked","message":REASON} and
-- is closed with 4003, once the calling transaction commits.
CREATE FUNCTION nudge.disconnect(user_id text, reason text DEFAULT NULL) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF user_id IS NULL OR user_id = '' THEN
        RAISE EXCEPTION 'nudge.disconnect: user_id must not be empty' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_notify('nudge_control', json_build_object(
        'op', 'disconnect', 'user', user_id, 'reason', left(coalesce(reason, 'revoked'), 200))::text);
END
$$;

-- Every subscription of the user matching the pattern (an exact topic, or a prefix ending in `*` as in tokens),
-- on every node, is dropped and announced with {"type":"unsubscribed","topic":T}, once the transaction commits.
CREATE FUNCTION nudge.unsubscribe(user_id text, topic_pattern text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF user_id IS NULL OR user_id = '' THEN
        RAISE EXCEPTION 'nudge.unsubscribe: user_id must not be empty' USING ERRCODE = '22023';
    END IF;
    IF topic_pattern IS NULL OR topic_pattern = '' OR char_length(topic_pattern) > 200 THEN
        RAISE EXCEPTION 'nudge.unsubscribe: topic_pattern must be a topic or a prefix ending in *'
            USING ERRCODE = '22023';
    END IF;
    PERFORM pg_notify('nudge_control', json_build_object(
        'op', 'unsubscribe', 'user', user_id, 'pattern', topic_pattern)::text);
END
$$;

-- Per live node: its cursor and lag; the cluster's pending events and the age of the oldest on every row.
CREATE VIEW nudge.status AS
SELECT n.id AS node_id, n.address, n.connections, n.cursor,
       greatest(d.last_seq - n.cursor, 0) AS lag_events,
       coalesce(extract(epoch FROM now() - (SELECT e.processed_at FROM nudge.events e WHERE e.seq = n.cursor + 1)),
                0)::float8 AS lag_seconds,
       n.heartbeat_at,
       (SELECT count(*) FROM nudge.events WHERE processed_at IS NULL) AS pending_events,
       coalesce(extract(epoch FROM now() - (SELECT e.occurred_at FROM nudge.events e WHERE e.processed_at IS NULL
                                             ORDER BY e.id LIMIT 1)), 0)::float8 AS oldest_pending_seconds
FROM nudge.nodes n CROSS JOIN nudge.delivery d
WHERE n.heartbeat_at >= now() - interval '15 seconds';

INSERT INTO nudge.schema_migrations (version, name) VALUES (7, 'presence');

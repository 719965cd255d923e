//! Writing this node's presence rows (sql/0007_presence.sql): the dirty users' rows as `presence.rs` computed
//! them, in two statements whatever their number.

use std::time::{SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use tokio_postgres::types::Type;

use super::QueryError;
use crate::presence::UserRows;

/// Upsert users still present, delete users gone, both for this node only.
const WRITE_USERS: &str = "WITH new AS (SELECT * FROM unnest($2::text[], $3::int4[], $4::timestamptz[]) \
       AS x(user_id, connections, since)), \
     up AS (INSERT INTO nudge.presence_users (node_id, user_id, connections, since) \
       SELECT $1, user_id, connections, since FROM new WHERE connections > 0 \
       ON CONFLICT (node_id, user_id) DO UPDATE SET connections = EXCLUDED.connections, since = EXCLUDED.since) \
     DELETE FROM nudge.presence_users p USING new \
     WHERE p.node_id = $1 AND p.user_id = new.user_id AND new.connections = 0";

/// The dirty users' subscriptions become exactly the given rows: upsert those, delete the others. (Both in one
/// statement see the same snapshot; the DELETE never touches a row the INSERT writes.)
const WRITE_TOPICS: &str = "WITH new AS (SELECT * FROM unnest($3::text[], $4::text[], $5::int4[]) \
       AS x(user_id, topic, connections)), \
     up AS (INSERT INTO nudge.presence_topics (node_id, user_id, topic, connections) \
       SELECT $1, user_id, topic, connections FROM new \
       ON CONFLICT (node_id, user_id, topic) DO UPDATE SET connections = EXCLUDED.connections) \
     DELETE FROM nudge.presence_topics p WHERE p.node_id = $1 AND p.user_id = ANY($2) \
       AND NOT EXISTS (SELECT 1 FROM new WHERE new.user_id = p.user_id AND new.topic = p.topic)";

/// Write the changed users' rows: two statements.
pub async fn write(pool: &Pool, node_id: &str, changes: &[UserRows]) -> Result<(), QueryError> {
    let users: Vec<&str> = changes.iter().map(|c| &*c.user).collect();
    let connections: Vec<i32> = changes.iter().map(|c| i32::try_from(c.connections).unwrap_or(i32::MAX)).collect();
    let since: Vec<SystemTime> = changes.iter().map(|c| c.since.unwrap_or(UNIX_EPOCH)).collect();
    let mut topic_users = Vec::new();
    let mut topics = Vec::new();
    let mut topic_connections = Vec::new();
    for change in changes {
        for (topic, n) in &change.topics {
            topic_users.push(&*change.user);
            topics.push(&**topic);
            topic_connections.push(i32::try_from(*n).unwrap_or(i32::MAX));
        }
    }
    let client = pool.get().await?;
    client
        .execute_typed(
            WRITE_USERS,
            &[
                (&node_id, Type::TEXT),
                (&users, Type::TEXT_ARRAY),
                (&connections, Type::INT4_ARRAY),
                (&since, Type::TIMESTAMPTZ_ARRAY),
            ],
        )
        .await?;
    client
        .execute_typed(
            WRITE_TOPICS,
            &[
                (&node_id, Type::TEXT),
                (&users, Type::TEXT_ARRAY),
                (&topic_users, Type::TEXT_ARRAY),
                (&topics, Type::TEXT_ARRAY),
                (&topic_connections, Type::INT4_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// Forget every presence row of this node: at start (rows of an earlier process with the same id) and at a
/// clean shutdown.
pub async fn clear(pool: &Pool, node_id: &str) -> Result<(), QueryError> {
    let client = pool.get().await?;
    client
        .execute_typed(
            "WITH u AS (DELETE FROM nudge.presence_users WHERE node_id = $1) \
             DELETE FROM nudge.presence_topics WHERE node_id = $1",
            &[(&node_id, Type::TEXT)],
        )
        .await?;
    Ok(())
}

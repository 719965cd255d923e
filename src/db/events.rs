//! The queries on event rows: claim (give pending rows a delivery `seq`), read past a cursor, replay for
//! `resume`, and delete after the retention.
//!
//! Why the order is cluster-wide and gapless: a claim takes its seq numbers from `nudge.delivery`'s single row
//! and holds that row's lock until it commits. The next claim, on any node, waits for that commit before it
//! takes numbers. So when a reader's snapshot shows seq N, every seq below N was committed before it and is
//! visible too: "read everything past my cursor, in seq order" never skips a row, however producers commit.
//!
//! Every query goes through `query_typed` (no named prepared statements), so the pool URL may point at PgBouncer
//! in transaction mode.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::value::RawValue;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

/// One deliverable event, as read past a cursor.
#[derive(Debug)]
pub struct Event {
    /// Cluster-wide delivery order.
    pub seq: i64,
    pub id: i64,
    pub topic: String,
    pub kind: String,
    /// `occurred_at` formatted by PostgreSQL as `2026-11-25T10:00:00.123Z`.
    pub at: String,
    /// Deduplicated, so a user listed twice is still nudged once.
    pub recipients: Option<Vec<String>>,
    pub data: Box<RawValue>,
}

/// What one claim statement did.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Rows claimed, expired ones included: fewer than the limit means nothing was left.
    pub claimed: usize,
    /// Rows older than the max age: marked processed, given no seq, never delivered.
    pub expired: usize,
    /// The deliverable rows, in seq order: consecutive seqs, since one claim takes one block of numbers.
    pub events: Vec<Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("event {id} has data that is not JSON: {source}")]
    Data { id: i64, source: serde_json::Error },
}

/// Claim up to `limit` pending rows and number the deliverable ones; with `tell_others`, NOTIFY every node:
/// `nudge.claim()` in sql/0003_wake_gate.sql (a function, so its plan is cached per session), with the planner
/// settings of sql/0005_claim_by_key.sql (that plan always goes through the primary key). One statement, so one
/// transaction: a crash before commit leaves the rows pending.
pub async fn claim_batch(pool: &Pool, limit: i64, max_age: Duration, tell_others: bool) -> Result<Claimed, QueryError> {
    let client = pool.get().await?;
    let rows = client
        .query_typed(
            "SELECT * FROM nudge.claim($1, $2, $3)",
            &[(&limit, Type::INT8), (&max_age.as_secs_f64(), Type::FLOAT8), (&tell_others, Type::BOOL)],
        )
        .await?;
    let claimed = rows.len();
    let live: Vec<&Row> = rows.iter().filter(|row| row.get::<_, Option<i64>>(0).is_some()).collect();
    let mut events = live.into_iter().map(event).collect::<Result<Vec<_>, _>>()?;
    events.sort_unstable_by_key(|e| e.seq);
    Ok(Claimed { claimed, expired: claimed - events.len(), events })
}

const COLUMNS: &str = r#"seq, id, topic, kind,
    to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), recipients, data::text"#;

/// Claimed events with seq greater than `cursor`, in seq order.
pub async fn read_after(pool: &Pool, cursor: i64, limit: i64) -> Result<Vec<Event>, QueryError> {
    let client = pool.get().await?;
    let sql = format!("SELECT {COLUMNS} FROM nudge.events WHERE seq > $1 ORDER BY seq LIMIT $2");
    let rows = client.query_typed(&sql, &[(&cursor, Type::INT8), (&limit, Type::INT8)]).await?;
    rows.iter().map(event).collect()
}

/// The highest seq handed out so far: where a starting node's cursor begins.
pub async fn last_seq(pool: &Pool) -> Result<i64, QueryError> {
    let client = pool.get().await?;
    Ok(read_last_seq(&client).await?)
}

/// `nudge.delivery.last_seq` on a given session (the pool's, or `nudge status`'s direct one).
pub async fn read_last_seq(client: &tokio_postgres::Client) -> Result<i64, tokio_postgres::Error> {
    Ok(client.query_typed_one("SELECT last_seq FROM nudge.delivery", &[]).await?.get(0))
}

/// What `resume` replays: one user's events in (since, until], personal or on one of `topics`.
#[derive(Debug)]
pub struct Replay {
    pub events: Vec<Event>,
    /// False when part of the range is gone (deleted after the retention) or more than `limit` events match.
    pub complete: bool,
    /// Live events up to here must not be sent again: `until`, or `since` when the client is ahead of this
    /// node's cursor (it saw them on a faster node). Never beyond the cluster's last seq.
    pub skip_through: i64,
}

pub async fn replay(
    pool: &Pool,
    user: &str,
    topics: &[&str],
    since: i64,
    until: i64,
    limit: i64,
) -> Result<Replay, QueryError> {
    let client = pool.get().await?;
    if since >= until {
        // Nothing to replay. A `since` beyond what the cluster ever handed out is another database's seq.
        let last = read_last_seq(&client).await?;
        let known = since <= last;
        return Ok(Replay { events: Vec::new(), complete: known, skip_through: if known { since } else { until } });
    }
    let sql = format!(
        "SELECT {COLUMNS} FROM nudge.events WHERE seq > $1 AND seq <= $2 \
         AND ($3 = ANY(recipients) OR (recipients IS NULL AND topic = ANY($4))) ORDER BY seq LIMIT $5"
    );
    let topics: Vec<&str> = topics.to_vec();
    let fetch = limit + 1;
    let rows = client
        .query_typed(
            &sql,
            &[
                (&since, Type::INT8),
                (&until, Type::INT8),
                (&user, Type::TEXT),
                (&topics, Type::TEXT_ARRAY),
                (&fetch, Type::INT8),
            ],
        )
        .await?;
    let mut events: Vec<Event> = rows.iter().map(event).collect::<Result<_, _>>()?;
    let truncated = events.len() as i64 > limit;
    events.truncate(limit as usize);
    // The oldest seq still stored: anything in (since, oldest) was deleted after the retention.
    let oldest: Option<i64> =
        client.query_typed_one("SELECT min(seq) FROM nudge.events WHERE seq IS NOT NULL", &[]).await?.get(0);
    let gone = match oldest {
        Some(oldest) => since + 1 < oldest,
        None => true,
    };
    Ok(Replay { events, complete: !truncated && !gone, skip_through: until })
}

/// Rows deleted per retention batch (its two statements together): small, so the sweep never holds many locks or
/// bloats one transaction.
pub const DELETE_BATCH: i64 = 1000;

/// Numbered rows are deleted as a prefix in seq order: everything up to the seq of the last row processed before
/// the cutoff, so "the oldest stored seq" tells `replay` exactly what is gone. (Claims that commit close together
/// can number and timestamp in opposite orders, by milliseconds: a row just past that seq waits for the next sweep.)
///
/// Every lookup goes through an index, so a sweep costs the rows it deletes, not the rows the table keeps: the
/// cutoff's seq through `events_processed_at` (newest first), the prefix through `events_seq`, the DELETE through
/// the primary key (`id = ANY (ARRAY(...))`; `id IN (...)` let PostgreSQL hash-join a scan of the whole table, about
/// 100 ms per batch with 100,000 rows, and one statement for both kinds of row scanned it twice).
pub const DELETE_NUMBERED: &str = r#"
DELETE FROM nudge.events
WHERE id = ANY (ARRAY(
    SELECT id FROM nudge.events
    WHERE seq <= (
        SELECT seq FROM nudge.events
        WHERE processed_at < now() - make_interval(secs => $1) AND seq IS NOT NULL
        ORDER BY processed_at DESC
        LIMIT 1
    )
    ORDER BY seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
"#;

/// Rows without a seq (expired, or processed under schema version 1) go by age alone. Run once the numbered
/// prefix is gone, so the walk along `events_processed_at` meets few numbered rows.
pub const DELETE_UNNUMBERED: &str = r#"
DELETE FROM nudge.events
WHERE id = ANY (ARRAY(
    SELECT id FROM nudge.events
    WHERE processed_at < now() - make_interval(secs => $1) AND seq IS NULL
    ORDER BY processed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
"#;

/// Delete up to one batch of rows processed more than `retention` ago: numbered ones first, then, if the batch
/// has room, unnumbered ones. Returns how many were deleted.
pub async fn delete_processed(pool: &Pool, retention: Duration) -> Result<u64, QueryError> {
    let client = pool.get().await?;
    let mut deleted = 0;
    for statement in [DELETE_NUMBERED, DELETE_UNNUMBERED] {
        let room = DELETE_BATCH - deleted as i64;
        if room == 0 {
            break;
        }
        deleted +=
            client.execute_typed(statement, &[(&retention.as_secs_f64(), Type::FLOAT8), (&room, Type::INT8)]).await?;
    }
    Ok(deleted)
}

fn event(row: &Row) -> Result<Event, QueryError> {
    let id: i64 = row.get(1);
    let recipients = row.get::<_, Option<Vec<String>>>(5).map(|mut users| {
        users.sort_unstable();
        users.dedup();
        users
    });
    let data = RawValue::from_string(row.get(6)).map_err(|source| QueryError::Data { id, source })?;
    Ok(Event { seq: row.get(0), id, topic: row.get(2), kind: row.get(3), at: row.get(4), recipients, data })
}

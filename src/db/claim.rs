//! The two queries that touch event rows: claiming a batch, and deleting processed rows after the retention.
//!
//! A claim is one statement, so one transaction: it locks pending rows in id order with `FOR UPDATE SKIP LOCKED`
//! (concurrent claimers, on this node or another, take disjoint rows), marks them processed, and returns them.
//! Events leave the process only after that transaction committed; a crash before the commit rolls the claim back
//! and the rows are claimed again.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::value::RawValue;

/// One claimed, deliverable event.
#[derive(Debug)]
pub struct ClaimedEvent {
    pub id: i64,
    pub topic: String,
    pub kind: String,
    /// `occurred_at` formatted by PostgreSQL as `2026-11-25T10:00:00.123Z`.
    pub at: String,
    /// Deduplicated, so a user listed twice is still nudged once.
    pub recipients: Option<Vec<String>>,
    pub data: Box<RawValue>,
}

/// A claimed batch: deliverable events in id order, and how many rows the claim took in all.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<ClaimedEvent>,
    /// Rows claimed, expired ones included: fewer than the limit means nothing was left.
    pub claimed: usize,
    pub expired: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("claim query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("event {id} has data that is not JSON: {source}")]
    Data { id: i64, source: serde_json::Error },
}

const CLAIM: &str = r#"
WITH next AS (
    SELECT id FROM nudge.events
    WHERE processed_at IS NULL
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE nudge.events e
SET processed_at = now()
FROM next
WHERE e.id = next.id
RETURNING e.id, e.topic, e.kind,
    to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    e.recipients,
    e.data::text,
    e.occurred_at < now() - make_interval(secs => $2)
"#;

/// Claim up to `limit` pending rows; events older than `max_age` are marked processed but not returned.
pub async fn claim_batch(pool: &Pool, limit: i64, max_age: Duration) -> Result<Batch, ClaimError> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(CLAIM).await?;
    let rows = client.query(&statement, &[&limit, &max_age.as_secs_f64()]).await?;
    let mut batch = Batch { claimed: rows.len(), ..Batch::default() };
    for row in rows {
        if row.get::<_, bool>(6) {
            batch.expired += 1;
            continue;
        }
        let id: i64 = row.get(0);
        let recipients = row.get::<_, Option<Vec<String>>>(4).map(|mut users| {
            users.sort_unstable();
            users.dedup();
            users
        });
        let data = RawValue::from_string(row.get(5)).map_err(|source| ClaimError::Data { id, source })?;
        batch.events.push(ClaimedEvent { id, topic: row.get(1), kind: row.get(2), at: row.get(3), recipients, data });
    }
    // RETURNING follows no particular order; delivery must follow ids.
    batch.events.sort_unstable_by_key(|e| e.id);
    Ok(batch)
}

/// Rows deleted per retention statement: small, so the sweep never holds many locks or bloats one transaction.
pub const DELETE_BATCH: i64 = 1000;

const DELETE_PROCESSED: &str = r#"
DELETE FROM nudge.events
WHERE id IN (
    SELECT id FROM nudge.events
    WHERE processed_at < now() - make_interval(secs => $1)
    ORDER BY processed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"#;

/// Delete one batch of rows processed more than `retention` ago; returns how many were deleted.
pub async fn delete_processed(pool: &Pool, retention: Duration) -> Result<u64, ClaimError> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(DELETE_PROCESSED).await?;
    Ok(client.execute(&statement, &[&retention.as_secs_f64(), &DELETE_BATCH]).await?)
}

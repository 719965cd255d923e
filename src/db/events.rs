//! The queries on event rows: claim (give pending rows a delivery `seq`), read past a cursor, replay for
//! `resume`, and delete after the retention.
//!
//! Why the order is cluster-wide and gapless: a claim takes its seq numbers from `nudge.delivery`'s single row
//! and holds that row's lock until it commits. The next claim, on any node, waits for that commit before it
//! takes numbers. So when a reader's snapshot shows seq N, every seq below N was committed before it and is
//! visible too: "read everything past my cursor, in seq order" never skips a row, however producers commit.
//!
//! Numbers are consecutive except at one place: the first claim after PostgreSQL (re)started or failed over skips
//! 1,000,000,000 (sql/0008_claim_commit.sql), so that seqs a lost commit handed out are never handed out again.
//! Nothing is ever numbered inside the skip, so readers need not know about it.
//!
//! Every query goes through `query_typed` (no named prepared statements), so the pool URL may point at PgBouncer
//! in transaction mode.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::value::RawValue;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use super::QueryError;

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

impl Event {
    /// `occurred_at` in milliseconds since the Unix epoch, read back from `at`; `None` if `at` is not in the
    /// claim's format. Hand-parsed (fixed positions, no allocation): it runs for every claimed event, for
    /// `nudge_event_age_at_claim_seconds`.
    pub fn occurred_at_millis(&self) -> Option<i64> {
        let b = self.at.as_bytes();
        let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')];
        if b.len() != 24 || separators.iter().any(|&(i, c)| b[i] != c) {
            return None;
        }
        let number = |from: usize, to: usize| -> Option<i64> {
            b[from..to].iter().try_fold(0i64, |n, &c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
        };
        let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
        let (hour, minute, second, milli) = (number(11, 13)?, number(14, 16)?, number(17, 19)?, number(20, 23)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let year_of_era = y - era * 400;
        let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        let days = era * 146_097 + day_of_era - 719_468;
        Some((((days * 24 + hour) * 60 + minute) * 60 + second) * 1000 + milli)
    }
}

#[cfg(test)]
impl Event {
    /// A well-formed event for unit tests: `seq` and `id` equal, kind `k`, empty data, a fixed `at`.
    pub(crate) fn sample(seq: i64, topic: &str, recipients: Option<&[&str]>) -> Event {
        Event {
            seq,
            id: seq,
            topic: topic.into(),
            kind: "k".into(),
            at: "2026-11-25T10:00:00.000Z".into(),
            recipients: recipients.map(|users| users.iter().map(|user| user.to_string()).collect()),
            data: RawValue::from_string("{}".into()).expect("json"),
        }
    }
}

/// What one claim statement did.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Rows claimed, expired ones included: fewer than the limit means nothing was left.
    pub claimed: usize,
    /// Rows older than the max age: marked processed, given no seq, never delivered.
    pub expired: usize,
    /// The deliverable rows that decoded, in seq order (one claim takes one block of consecutive numbers).
    pub batch: Batch,
}

/// Numbered rows read in seq order: the ones that decode, and how far the read went.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// The highest seq read, skipped rows included: where a cursor moves after routing this batch.
    pub through: Option<i64>,
    /// Rows that could not be decoded: skipped, each logged once with its id, never retried.
    pub rejected: usize,
    /// When this node's claim of the batch committed (its statement returned); `None` for rows read back. The
    /// start of `nudge_claim_to_routed_seconds`.
    pub claimed_at: Option<tokio::time::Instant>,
}

impl Batch {
    /// Decode rows in any order into a batch in seq order. A row that does not decode is skipped with a WARN
    /// naming its id: one bad row must never stop a loop (it would be read again forever).
    fn decode(rows: &[Row]) -> Batch {
        let mut batch = Batch::default();
        for row in rows {
            let Ok(Some(seq)) = row.try_get::<_, Option<i64>>(0) else { continue };
            batch.through = batch.through.max(Some(seq));
            match event(row) {
                Ok(event) => batch.events.push(event),
                Err(e) => {
                    tracing::warn!("skipping event: {e}");
                    batch.rejected += 1;
                }
            }
        }
        batch.events.sort_unstable_by_key(|e| e.seq);
        batch
    }

    pub fn len(&self) -> usize {
        self.events.len() + self.rejected
    }

    pub fn is_empty(&self) -> bool {
        self.through.is_none()
    }
}

/// Why a claimed row cannot become an event frame (only rows written before the CHECKs of schema version 6, or
/// by a role that bypassed them).
#[derive(Debug, thiserror::Error)]
#[error("event {id} cannot be delivered: {reason}")]
pub struct Undecodable {
    pub id: i64,
    pub reason: String,
}

/// Claim up to `limit` pending rows and number the deliverable ones; with `tell_others`, NOTIFY every node; with
/// `commit_async`, without waiting for the WAL flush (`NUDGE_CLAIM_COMMIT=async`): `nudge.claim()` in
/// sql/0008_claim_commit.sql (a function, so its plan is cached per session), with the planner settings of
/// sql/0005_claim_by_key.sql (that plan always goes through the primary key). One statement, so one transaction: a
/// crash before commit leaves the rows pending.
pub async fn claim_batch(
    pool: &Pool,
    limit: i64,
    max_age: Duration,
    tell_others: bool,
    commit_async: bool,
) -> Result<Claimed, QueryError> {
    let client = pool.get().await?;
    let rows = client
        .query_typed(
            "SELECT * FROM nudge.claim($1, $2, $3, $4)",
            &[
                (&limit, Type::INT8),
                (&max_age.as_secs_f64(), Type::FLOAT8),
                (&tell_others, Type::BOOL),
                (&commit_async, Type::BOOL),
            ],
        )
        .await?;
    let batch = Batch::decode(&rows);
    let claimed = rows.len();
    Ok(Claimed { claimed, expired: claimed - batch.len(), batch })
}

/// The columns of an event row, in the order `event()` decodes them (a macro, so that `concat!` can build
/// constant statements from it).
macro_rules! columns {
    () => {
        r#"seq, id, topic, kind, to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), recipients, data::text"#
    };
}

/// Claimed events with seq greater than `cursor`, in seq order.
pub async fn read_after(pool: &Pool, cursor: i64, limit: i64) -> Result<Batch, QueryError> {
    let client = pool.get().await?;
    const SQL: &str = concat!("SELECT ", columns!(), " FROM nudge.events WHERE seq > $1 ORDER BY seq LIMIT $2");
    let rows = client.query_typed(SQL, &[(&cursor, Type::INT8), (&limit, Type::INT8)]).await?;
    Ok(Batch::decode(&rows))
}

/// The highest seq handed out so far: where a starting node's cursor begins.
pub async fn last_seq(pool: &Pool) -> Result<i64, QueryError> {
    let client = pool.get().await?;
    read_last_seq(&client).await
}

/// `nudge.delivery.last_seq` on a given session (the pool's, or `nudge status`'s direct one).
pub async fn read_last_seq(client: &tokio_postgres::Client) -> Result<i64, QueryError> {
    Ok(client.query_typed_one("SELECT last_seq FROM nudge.delivery", &[]).await?.get(0))
}

/// What `resume` (and a slow connection's catch-up) replays: one user's events in (since, until].
#[derive(Debug)]
pub struct Replay {
    pub events: Vec<Event>,
    /// False when part of the range is gone (deleted after the retention), when `since` is beyond anything
    /// the cluster handed out, or when more than `limit` events match.
    pub complete: bool,
    /// Live events up to here must not be sent again: `until`, or `since` when the client is ahead of this
    /// node's cursor (it saw them on a faster node). Never beyond the cluster's last seq.
    pub skip_through: i64,
    /// The highest seq the replay covers: `until`, or the last event returned when `limit` cut it short.
    pub reached: i64,
}

/// The replay's events: $1 since, $2 until, $3 the user, $4 the connection's topics, $5 how many at most (per
/// kind; the caller keeps the first of the merged, sorted rows). Each half has an index of its own (schema
/// version 6), so neither walks the seq range past other users' events.
pub const REPLAY: &str = concat!(
    "(SELECT ",
    columns!(),
    " FROM nudge.events WHERE recipients @> ARRAY[$3::text] AND seq > $1 AND seq <= $2 ORDER BY seq LIMIT $5) ",
    "UNION ALL (SELECT ",
    columns!(),
    " FROM nudge.events WHERE recipients IS NULL AND topic = ANY($4) AND seq > $1 AND seq <= $2 ORDER BY seq LIMIT $5)"
);

/// One user's events in (since, until], personal or on one of `topics`, at most `limit`, in seq order.
///
/// The range is checked first, with three single-row lookups: a `since` beyond the cluster's last seq, or below
/// what the retention deleted (`nudge.retention`, schema version 8), is answered `complete: false` without reading
/// any event. The events are then found through indexes of their own (schema version 6): personal ones through
/// `events_recipients` (GIN), topic ones through `events_topic_seq`, so a replay costs this user's and these
/// topics' events, not the history of everyone else.
pub async fn replay(
    pool: &Pool,
    user: &str,
    topics: &[&str],
    since: i64,
    until: i64,
    limit: i64,
) -> Result<Replay, QueryError> {
    let client = pool.get().await?;
    let bounds = client
        .query_typed_one(
            "SELECT (SELECT last_seq FROM nudge.delivery), (SELECT deleted_through FROM nudge.retention), \
             EXISTS (SELECT 1 FROM nudge.events WHERE seq IS NOT NULL)",
            &[],
        )
        .await?;
    let (last, deleted_through, any_stored): (i64, i64, bool) = (bounds.get(0), bounds.get(1), bounds.get(2));
    if since > last {
        // Another database's seq: nothing here can be trusted to continue it.
        return Ok(Replay { events: Vec::new(), complete: false, skip_through: until, reached: until });
    }
    if since >= until {
        return Ok(Replay { events: Vec::new(), complete: true, skip_through: since, reached: until });
    }
    // Part of (since, until] was deleted (the retention, a DELETE or TRUNCATE: their triggers move
    // `deleted_through`); or nothing is stored at all while the cluster handed out seqs past `since` (a delete with
    // triggers disabled, which no trigger sees). The client must refetch, and a partial replay would not spare it.
    // (The oldest stored seq cannot tell: numbering skips after a PostgreSQL restart.)
    if since < deleted_through || !any_stored {
        return Ok(Replay { events: Vec::new(), complete: false, skip_through: until, reached: until });
    }
    let fetch = limit + 1;
    let topics: Vec<&str> = topics.to_vec();
    let rows = client
        .query_typed(
            REPLAY,
            &[
                (&since, Type::INT8),
                (&until, Type::INT8),
                (&user, Type::TEXT),
                (&topics, Type::TEXT_ARRAY),
                (&fetch, Type::INT8),
            ],
        )
        .await?;
    let mut events = Batch::decode(&rows).events;
    let truncated = events.len() as i64 > limit;
    events.truncate(limit as usize);
    let reached = if truncated { events.last().map_or(until, |e| e.seq) } else { until };
    Ok(Replay { events, complete: !truncated, skip_through: until, reached })
}

/// Rows deleted per retention batch (its two statements together): small, so the sweep never holds many locks or
/// bloats one transaction.
pub const DELETE_BATCH: i64 = 1000;

/// Numbered rows are deleted as a prefix in seq order: everything up to the seq of the last row processed before
/// the cutoff, so `nudge.retention.deleted_through` (moved by a trigger on every DELETE) tells `replay` exactly what
/// is gone. (Claims that commit close together
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

/// One row of `columns!()` (or of `nudge.claim()`), checked field by field: nothing a producer wrote may panic here.
fn event(row: &Row) -> Result<Event, Undecodable> {
    let id: i64 = row.try_get(1).map_err(|e| Undecodable { id: -1, reason: e.to_string() })?;
    let bad = |what: &str, e: &dyn std::fmt::Display| Undecodable { id, reason: format!("{what}: {e}") };
    let seq: i64 = row.try_get(0).map_err(|e| bad("seq", &e))?;
    let topic: String = row.try_get(2).map_err(|e| bad("topic", &e))?;
    let kind: String = row.try_get(3).map_err(|e| bad("kind", &e))?;
    // to_char gives NULL for an infinite timestamp.
    let at: String = row
        .try_get::<_, Option<String>>(4)
        .map_err(|e| bad("occurred_at", &e))?
        .ok_or_else(|| bad("occurred_at", &"not a finite time"))?;
    let recipients = row.try_get::<_, Option<Vec<String>>>(5).map_err(|e| bad("recipients", &e))?.map(|mut users| {
        users.sort_unstable();
        users.dedup();
        users
    });
    let data: String = row.try_get(6).map_err(|e| bad("data", &e))?;
    let data = RawValue::from_string(data).map_err(|e| bad("data", &e))?;
    Ok(Event { seq, id, topic, kind, at, recipients, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at: &str) -> Event {
        Event { at: at.into(), ..Event::sample(1, "t", None) }
    }

    #[test]
    fn occurred_at_reads_back_the_claims_format_and_nothing_else() {
        assert_eq!(at("1970-01-01T00:00:00.000Z").occurred_at_millis(), Some(0));
        assert_eq!(at("2026-12-04T19:30:05.123Z").occurred_at_millis(), Some(1_796_412_605_123));
        assert_eq!(at("2000-02-29T23:59:59.999Z").occurred_at_millis(), Some(951_868_799_999));
        assert_eq!(at("1969-12-31T23:59:59.000Z").occurred_at_millis(), Some(-1000));
        for bad in [
            "",
            "2026-12-04 19:30:05.123Z",
            "2026-13-04T19:30:05.123Z",
            "2026-12-04T19:30:05.12xZ",
            "2026-12-04T19:30:05.123+00",
        ] {
            assert_eq!(at(bad).occurred_at_millis(), None, "{bad:?}");
        }
    }
}

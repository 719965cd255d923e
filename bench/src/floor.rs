//! The floor (`--mode floor`): the physical limit of nudge's path on this PostgreSQL, measured with no relay
//! running. A sample is what any relay built on LISTEN and a claim must wait for at least:
//!
//! 1. the NOTIFY round trip: a producer session INSERTs one row into `nudge.events` (nudge's trigger NOTIFYs, as
//!    no relay holds the wake gate) and its COMMIT returns; a LISTEN session reads the notification. Timed from
//!    the COMMIT's reply, the reference every latency of nudge-bench starts from, to the notification's arrival
//!    (0 when the notification arrived first, counted as `early`);
//! 2. one claim statement, `SELECT * FROM nudge.claim(1, …)`, on the already open LISTEN session, taking that row
//!    (committing as `--claim-commit` says: durable, or without waiting for the WAL flush).
//!
//! Their sum per sample is the floor a delivery's commit-to-client latency is compared with: what nudge adds on top
//! is routing, the WebSocket write and the client's read. The table must hold no other pending row (the bench
//! truncates it first), and no relay may run: one would take the row or the wake gate.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::stats::{new_histogram, now_us, percentile_ms};

/// Samples measured but not counted: the first statements of a session plan and warm the caches.
const WARMUP: u64 = 10;

/// `commit_async`: claim as `NUDGE_CLAIM_COMMIT=async` does, without waiting for the WAL flush.
pub async fn run(
    database_url: &str,
    samples: u64,
    pause: Duration,
    commit_async: bool,
) -> Result<serde_json::Value, String> {
    let samples = if samples == 0 { 200 } else { samples };
    // The LISTEN session: its connection is driven here, so that notifications arrive with their receive time.
    let (listener, mut connection) =
        tokio_postgres::connect(database_url, NoTls).await.map_err(|e| format!("database: {e}"))?;
    let (tx, mut notifications) = mpsc::unbounded_channel::<u64>();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) if n.channel() == "nudge" => {
                    let _ = tx.send(now_us());
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("nudge-bench: floor: listen connection: {e}");
                    break;
                }
            }
        }
    });
    let (producer, connection) =
        tokio_postgres::connect(database_url, NoTls).await.map_err(|e| format!("database: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("nudge-bench: floor: producer connection: {e}");
        }
    });
    let pending: i64 = listener
        .query_one("SELECT count(*) FROM nudge.events WHERE processed_at IS NULL", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if pending > 0 {
        return Err(format!("floor: {pending} pending rows in nudge.events; the floor needs an empty queue"));
    }
    listener.batch_execute("LISTEN nudge").await.map_err(|e| format!("LISTEN: {e}"))?;
    let insert = producer
        .prepare(
            "INSERT INTO nudge.events (topic, kind, recipients, data) \
             VALUES ('bench', 'bench.floor', ARRAY['floor'], '{\"bench\": true}') RETURNING id",
        )
        .await
        .map_err(|e| e.to_string())?;
    // As nudge calls it (src/db/events.rs): batch, max_age in seconds, tell_others, commit_async.
    let claim = listener.prepare("SELECT * FROM nudge.claim($1, $2, $3, $4)").await.map_err(|e| e.to_string())?;

    let (mut notify, mut claims, mut sums, mut insert_to_notify) =
        (new_histogram(), new_histogram(), new_histogram(), new_histogram());
    let (mut early, mut missed) = (0u64, 0u64);
    for i in 0..WARMUP + samples {
        while notifications.try_recv().is_ok() {}
        let sent = now_us();
        let row = producer.query_one(&insert, &[]).await.map_err(|e| format!("insert: {e}"))?;
        let committed = now_us();
        let id: i64 = row.get(0);
        let Ok(Some(arrived)) = tokio::time::timeout(Duration::from_secs(5), notifications.recv()).await else {
            // No notification (a relay holds the wake gate?): claim the row anyway, count the sample as missed.
            missed += 1;
            listener.query(&claim, &[&1i64, &3600.0f64, &false, &commit_async]).await.map_err(|e| e.to_string())?;
            continue;
        };
        let claim_start = now_us();
        let rows = listener
            .query(&claim, &[&1i64, &3600.0f64, &false, &commit_async])
            .await
            .map_err(|e| format!("claim: {e}"))?;
        let claim_end = now_us();
        if rows.len() != 1 || rows[0].get::<_, Option<i64>>(1) != Some(id) {
            return Err(format!("floor: the claim returned {} rows, not the row {id} just inserted", rows.len()));
        }
        if i >= WARMUP {
            if arrived < committed {
                early += 1;
            }
            let n = arrived.saturating_sub(committed);
            let c = claim_end - claim_start;
            notify.saturating_record(n);
            claims.saturating_record(c);
            sums.saturating_record(n + c);
            insert_to_notify.saturating_record(arrived.saturating_sub(sent));
        }
        tokio::time::sleep(pause).await;
    }
    let figures = |h: &hdrhistogram::Histogram<u64>| {
        json!({
            "count": h.len(),
            "p50": percentile_ms(h, 0.50),
            "p90": percentile_ms(h, 0.90),
            "p99": percentile_ms(h, 0.99),
            "max": percentile_ms(h, 1.0),
        })
    };
    eprintln!(
        "nudge-bench: floor: {samples} samples, notify p50 {:.3} ms, claim p50 {:.3} ms, sum p50 {:.3} / p99 {:.3} ms",
        percentile_ms(&notify, 0.5),
        percentile_ms(&claims, 0.5),
        percentile_ms(&sums, 0.5),
        percentile_ms(&sums, 0.99)
    );
    Ok(json!({
        "mode": "floor",
        "claim_commit": if commit_async { "async" } else { "durable" },
        "connections": 0,
        "samples": sums.len(),
        "pause_ms": pause.as_secs_f64() * 1e3,
        "early": early,
        "missed": missed,
        "notify_ms": figures(&notify),
        "claim_ms": figures(&claims),
        "insert_to_notify_ms": figures(&insert_to_notify),
        // The floor a delivery is compared with: NOTIFY round trip plus one claim, per sample.
        "latency_ms": figures(&sums),
        "deliveries": sums.len(),
    }))
}

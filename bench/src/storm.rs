//! The resume storm: a history of delivered events (`history` mode fills it before nudge starts), then rounds of
//! many clients that connect, subscribe and `resume` from seq 0 at once (`storm` mode), while the live client of
//! the main run measures the latency of ordinary events.
//!
//! The history's layout is arithmetic, so every storm client knows how many events its replay must hold. Row j
//! (0-based, seq j + 1) of N: three rows in five are personal, to user `h{p mod users}` (p numbers the personal
//! rows in order), the other two are on topic `t{q mod topics}` (q numbers the topic rows). A storm client is user
//! `h{k}` subscribed to two topics, so its replay is its personal rows plus both topics' rows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Barrier;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::stats::now_us;
use crate::worker::{connect_as, Target};

/// The history's shape: rows, and the users and topics they are spread over.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub rows: u64,
    pub users: u64,
    pub topics: u64,
}

impl Layout {
    fn personal_rows(&self) -> u64 {
        self.rows / 5 * 3 + (self.rows % 5).min(3)
    }

    /// Events a replay from seq 0 holds for user `h{user}` subscribed to topics `t{topic}`.
    pub fn expected(&self, user: u64, topics: &[u64]) -> u64 {
        let share = |rows: u64, of: u64, i: u64| rows / of + u64::from(i < rows % of);
        let personal = self.personal_rows();
        share(personal, self.users, user)
            + topics.iter().map(|&t| share(self.rows - personal, self.topics, t)).sum::<u64>()
    }

    /// Storm client `k` of round `round`: its user and its two topics, different from round to round.
    pub fn client(&self, round: usize, clients: usize, k: usize) -> (u64, [u64; 2]) {
        let n = (round * clients + k) as u64;
        (n % self.users, [n % self.topics, (n + self.topics / 2) % self.topics])
    }
}

async fn connect_db(database_url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) =
        tokio_postgres::connect(database_url, tokio_postgres::NoTls).await.map_err(|e| format!("database: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("nudge-bench: history connection: {e}");
        }
    });
    Ok(client)
}

/// Fill an empty `nudge.events` with `layout.rows` delivered events, seqs 1..=rows, and set
/// `nudge.delivery.last_seq` to match, in one transaction; then VACUUM ANALYZE, as autovacuum would after that
/// many rows. Run it while no node runs: a running node's cursor would be behind the new seqs and it would
/// deliver the whole history live.
///
/// The rows are written already claimed: schema v6's trigger refuses a producer's `seq` and `processed_at`, and
/// `session_replication_role = replica` (superuser, as the backlog mode) skips it, together with the NOTIFY
/// trigger; CHECK constraints still apply. This takes a minute for a million rows instead of the claim loop's many.
pub async fn fill_history(database_url: &str, layout: Layout) -> Result<f64, String> {
    let mut client = connect_db(database_url).await?;
    let started = Instant::now();
    let recent: i64 = client
        .query_one("SELECT count(*) FROM nudge.nodes WHERE heartbeat_at > now() - interval '10 seconds'", &[])
        .await
        .map_err(|e| format!("reading nudge.nodes: {e}"))?
        .get(0);
    if recent > 0 {
        eprintln!(
            "nudge-bench: warning: {recent} node(s) heartbeat in the last 10 s; fill the history before starting nudge"
        );
    }
    client
        .batch_execute("SET session_replication_role = replica")
        .await
        .map_err(|e| format!("SET session_replication_role (needs a superuser): {e}"))?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let busy: bool =
        tx.query_one("SELECT EXISTS (SELECT 1 FROM nudge.events)", &[]).await.map_err(|e| e.to_string())?.get(0);
    if busy {
        return Err("history mode needs an empty nudge.events (seqs 1..N, so that `resume` from 0 is complete)".into());
    }
    let (users, topics) = (layout.users as i64, layout.topics as i64);
    const CHUNK: i64 = 100_000;
    let mut from = 0i64;
    while from < layout.rows as i64 {
        let to = (from + CHUNK).min(layout.rows as i64);
        tx.execute(
            "INSERT INTO nudge.events (topic, kind, recipients, data, seq, processed_at) \
             SELECT CASE WHEN j % 5 < 3 THEN 'bench' ELSE 't' || ((j / 5 * 2 + j % 5 - 3) % $4) END, \
                    'bench.history', \
                    CASE WHEN j % 5 < 3 THEN ARRAY['h' || ((j / 5 * 3 + j % 5) % $3)] END, \
                    '{\"bench\": \"history\"}', j + 1, now() \
             FROM generate_series($1::bigint, $2::bigint - 1) AS j",
            &[&from, &to, &users, &topics],
        )
        .await
        .map_err(|e| format!("inserting the history: {e}"))?;
        eprintln!("nudge-bench: history: {to} rows");
        from = to;
    }
    tx.execute("UPDATE nudge.delivery SET last_seq = $1", &[&(layout.rows as i64)])
        .await
        .map_err(|e| format!("setting nudge.delivery.last_seq: {e}"))?;
    tx.commit().await.map_err(|e| format!("committing the history: {e}"))?;
    client.batch_execute("VACUUM ANALYZE nudge.events").await.map_err(|e| format!("VACUUM ANALYZE: {e}"))?;
    Ok(started.elapsed().as_secs_f64())
}

/// One storm round's outcome.
#[derive(Debug, Default)]
pub struct Round {
    pub clients: usize,
    pub connected: usize,
    pub failed: BTreeMap<String, u64>,
    /// Clients that got their `resumed` reply.
    pub resumed: usize,
    pub complete: usize,
    /// Clients whose replay was not what the history holds for them (count or frames), or incomplete.
    pub wrong: usize,
    /// From each client's `resume` sent to its `resumed` read, ms.
    pub resumed_ms: Vec<f64>,
    /// Event frames replayed, over all clients.
    pub replayed: u64,
    /// From the first connect to the last subscribe reply (every client connected), s.
    pub connect_s: f64,
}

#[derive(Deserialize)]
struct Resumed {
    replayed: u64,
    complete: bool,
}

/// What one storm client saw.
enum Outcome {
    Failed(String),
    Resumed { ms: f64, frames: u64, replayed: u64, complete: bool, expected: u64 },
}

/// Connect `clients` clients (round `round`), all at once; when all are subscribed, every one sends
/// `resume since 0` at the same moment and reads until its `resumed`. Then they close.
pub async fn round(target: &Target, secret: &str, layout: Layout, clients: usize, round: usize) -> Round {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let tasks: Vec<_> = (0..clients)
        .map(|k| {
            let (target, secret, barrier) = (target.clone(), secret.to_owned(), barrier.clone());
            tokio::spawn(async move {
                let (user, topics) = layout.client(round, clients, k);
                let expected = layout.expected(user, &topics);
                let topics: Vec<String> = topics.iter().map(|t| format!("t{t}")).collect();
                let connected = connect_as(&target, &secret, &format!("h{user}"), &topics).await;
                // Everyone waits here, connected or not, so the resumes leave together.
                barrier.wait().await;
                let mut ws = match connected {
                    Ok(ws) => ws,
                    Err(e) => return Outcome::Failed(e),
                };
                let sent = Instant::now();
                if let Err(e) = ws.send(Message::text(json!({"type": "resume", "since": 0}).to_string())).await {
                    return Outcome::Failed(format!("sending resume: {e}"));
                }
                let mut frames = 0;
                let read = async {
                    while let Some(frame) = ws.next().await {
                        match frame {
                            Ok(Message::Text(text)) if text.starts_with(r#"{"type":"event""#) => frames += 1,
                            Ok(Message::Text(text)) if text.contains(r#""type":"resumed""#) => {
                                return serde_json::from_str::<Resumed>(&text).map_err(|e| format!("{e}: {text}"));
                            }
                            Ok(Message::Text(text)) => return Err(format!("unexpected: {text}")),
                            Ok(Message::Close(frame)) => return Err(format!("closed: {frame:?}")),
                            Ok(_) => {}
                            Err(e) => return Err(format!("error: {e}")),
                        }
                    }
                    Err("closed".into())
                };
                let reply = tokio::time::timeout(Duration::from_secs(60), read).await;
                let ms = sent.elapsed().as_secs_f64() * 1e3;
                match reply {
                    Ok(Ok(r)) => Outcome::Resumed { ms, frames, replayed: r.replayed, complete: r.complete, expected },
                    Ok(Err(e)) => Outcome::Failed(e),
                    Err(_) => Outcome::Failed("no `resumed` within 60 s".into()),
                }
            })
        })
        .collect();
    let started_us = now_us();
    barrier.wait().await;
    let connect_s = (now_us() - started_us) as f64 / 1e6;
    let mut out = Round { clients, connect_s, ..Round::default() };
    for task in tasks {
        match task.await {
            Ok(Outcome::Resumed { ms, frames, replayed, complete, expected }) => {
                out.connected += 1;
                out.resumed += 1;
                out.complete += usize::from(complete);
                out.wrong += usize::from(!complete || replayed != expected || frames != replayed);
                out.resumed_ms.push(ms);
                out.replayed += frames;
            }
            Ok(Outcome::Failed(e)) => {
                // "closed: Some(CloseFrame { code: Again, reason: \"...\" })" and the like: first words only.
                let key: String = e.chars().take(80).collect();
                *out.failed.entry(key).or_default() += 1;
            }
            Err(e) => *out.failed.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQL's arithmetic, row by row, against `expected`.
    #[test]
    fn expected_counts_match_the_layout() {
        let layout = Layout { rows: 10_007, users: 97, topics: 13 };
        let (mut by_user, mut by_topic) = (vec![0u64; 97], vec![0u64; 13]);
        for j in 0..layout.rows {
            if j % 5 < 3 {
                by_user[((j / 5 * 3 + j % 5) % 97) as usize] += 1;
            } else {
                by_topic[((j / 5 * 2 + j % 5 - 3) % 13) as usize] += 1;
            }
        }
        for k in 0..300 {
            let (user, topics) = layout.client(1, 300, k);
            let want = by_user[user as usize] + topics.iter().map(|&t| by_topic[t as usize]).sum::<u64>();
            assert_eq!(layout.expected(user, &topics), want, "client {k}");
        }
    }
}

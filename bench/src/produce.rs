//! The producers: writer connections INSERTing events through PostgreSQL exactly as a backend would (one row,
//! one implicit transaction each; or `--batch` rows per statement), and the one-transaction backlog.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use crate::stats::now_us;
use crate::worker::{is_stalled, wakeup_message, Progress, Sinks};
use crate::Mode;

/// What the writers do, shared by all of them.
pub struct Writers {
    pub database_url: String,
    pub writers: usize,
    /// Events per INSERT statement (targeted and topic modes).
    pub batch: usize,
    /// Events per second over all writers; 0 = flat out.
    pub rate: f64,
    pub duration: Duration,
    pub mode: Mode,
    pub connections: usize,
    pub stalled: usize,
    /// Produce mode's table (validated as an identifier by the caller).
    pub table: String,
    /// Wakeup mode: the write halves of the (single, in-process) worker's connections, by index.
    pub sinks: Option<Arc<Sinks>>,
    /// Targeted mode: events go to users u0..u{active-1} only (0: to every connection).
    pub active: usize,
    /// Stop after this many events (0: at the end of `duration`).
    pub count: u64,
    /// Wakeup mode, closed loop: after each wakeup wait until its event has been read (the worker's per-connection
    /// counters), then pause this long.
    pub closed_loop: Option<(Duration, Arc<Vec<Arc<AtomicU64>>>)>,
    /// Closed loop (`--window`), or None: the writers keep the rate whatever the readers do.
    pub window: Option<Window>,
    /// Each event's `data`, a JSON object (`event_data`): interpolated into the INSERT.
    pub data: String,
    /// Stop before `duration` once this is set (the resume storm ends the writers when its rounds are over).
    pub stop: Option<Arc<AtomicBool>>,
}

/// An event's `data`: `{"bench": true}`, padded with a `pad` string to about `bytes` bytes (as PostgreSQL's jsonb
/// prints it) when `bytes` is larger. Letters only, so it can be written into SQL as a literal.
pub fn event_data(bytes: usize) -> String {
    const HEAD: &str = r#"{"bench": true, "pad": ""#;
    const TAIL: &str = r#""}"#;
    match bytes.checked_sub(HEAD.len() + TAIL.len()) {
        Some(pad) if pad > 0 => format!("{HEAD}{}{TAIL}", "x".repeat(pad)),
        _ => r#"{"bench": true}"#.to_owned(),
    }
}

/// How far the writers may run ahead of the slowest reader: a server offered more than it can deliver fills its
/// per-connection queues and closes the slowest readers (1013), which measures the overload policy, not the
/// throughput. The socket ceiling waits for its sockets; with a window the writers wait for the readers.
pub struct Window {
    /// Events the slowest reading connection may lag behind the committed ones before a writer waits.
    limit: u64,
    /// Every worker's progress; their slowest connection is the one that counts.
    progress: Vec<Arc<Progress>>,
    /// Events committed so far.
    committed: AtomicU64,
}

impl Window {
    pub fn new(limit: u64, progress: Vec<Arc<Progress>>) -> Window {
        Window { limit, progress, committed: AtomicU64::new(0) }
    }

    fn ahead(&self) -> bool {
        let slowest = self.progress.iter().map(|p| p.slowest.load(Ordering::Relaxed)).min().unwrap_or(u64::MAX);
        self.committed.load(Ordering::Relaxed).saturating_sub(slowest) > self.limit
    }

    /// Wait until the slowest reader is within the window again (true), or the deadline passes first (false).
    async fn wait(&self, deadline: Instant) -> bool {
        while self.ahead() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }
}

pub struct Produced {
    pub events: u64,
    /// Deliveries expected from these events in targeted and wakeup modes (stalled recipients excluded).
    pub expected: u64,
    /// (event id, commit time) for targeted and topic modes; (event id, wakeup sent) in wakeup mode.
    pub commits: Vec<(i64, u64)>,
    pub started_us: u64,
    pub secs: f64,
}

async fn connect(database_url: &str) -> Result<Client, String> {
    let (client, connection) =
        tokio_postgres::connect(database_url, tokio_postgres::NoTls).await.map_err(|e| format!("database: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("nudge-bench: writer connection: {e}");
        }
    });
    Ok(client)
}

/// Run every writer for the duration and gather what they wrote.
pub async fn produce(setup: Arc<Writers>) -> Result<Produced, String> {
    // Connect and prepare every writer first, so connection setup is not part of the measured time.
    let prepared = (0..setup.writers.max(1)).map(|_| prepare(&setup));
    let clients = futures_util::future::try_join_all(prepared).await?;
    let started = Instant::now();
    let started_us = now_us();
    let writers = clients.into_iter().enumerate().map(|(w, (client, statement))| {
        let setup = setup.clone();
        tokio::spawn(async move { write_events(&setup, w, &client, &statement, started).await })
    });
    let mut produced = Produced { events: 0, expected: 0, commits: Vec::new(), started_us, secs: 0.0 };
    for writer in futures_util::future::join_all(writers).await {
        let log = writer.map_err(|e| e.to_string())??;
        produced.events += log.events;
        produced.expected += log.expected;
        produced.commits.extend(log.commits);
    }
    produced.secs = started.elapsed().as_secs_f64();
    Ok(produced)
}

async fn prepare(setup: &Writers) -> Result<(Client, Statement), String> {
    let client = connect(&setup.database_url).await?;
    let sql = match setup.mode {
        // A backend's INSERT, no RETURNING: the figure is what nudge's trigger costs a producer.
        Mode::Produce => format!(
            "INSERT INTO {} (topic, kind, recipients, data) VALUES ('bench', 'bench.event', $1, '{}')",
            setup.table, setup.data
        ),
        Mode::Targeted | Mode::Topic if setup.batch > 1 => format!(
            "INSERT INTO nudge.events (topic, kind, recipients, data) \
             SELECT 'bench', 'bench.event', CASE WHEN $2 THEN ARRAY[u] END, '{}' \
             FROM unnest($1::text[]) AS u RETURNING id",
            setup.data
        ),
        _ => format!(
            "INSERT INTO nudge.events (topic, kind, recipients, data) \
             VALUES ('bench', 'bench.event', $1, '{}') RETURNING id",
            setup.data
        ),
    };
    if setup.mode == Mode::Wakeup {
        // Rows must not wake nudge through the trigger: the client's wakeup is what is measured. Replica mode
        // skips ordinary triggers; it needs a superuser, which the bench's throwaway cluster provides.
        client
            .batch_execute("SET session_replication_role = replica")
            .await
            .map_err(|e| format!("SET session_replication_role (needs a superuser): {e}"))?;
    }
    let statement = client.prepare(&sql).await.map_err(|e| format!("{sql}: {e}"))?;
    Ok((client, statement))
}

struct WriterLog {
    events: u64,
    expected: u64,
    commits: Vec<(i64, u64)>,
}

/// One writer: event K (K = w, w + W, w + 2W, …) goes to user u{K mod N}, or to topic `bench` in topic mode.
async fn write_events(
    setup: &Writers,
    w: usize,
    client: &Client,
    statement: &Statement,
    started: Instant,
) -> Result<WriterLog, String> {
    let writers = setup.writers.max(1);
    let n = if setup.active > 0 { setup.active } else { setup.connections.max(1) };
    let per_tick = if matches!(setup.mode, Mode::Targeted | Mode::Topic) { setup.batch.max(1) } else { 1 };
    // Whether an event to this recipient is expected back: every topic event; targeted ones unless the
    // recipient's connection was told to stop reading.
    let expected = |recipient| setup.mode == Mode::Topic || !is_stalled(recipient, setup.connections, setup.stalled);
    let mut tick = (setup.rate > 0.0).then(|| {
        let mut tick = tokio::time::interval(Duration::from_secs_f64((writers * per_tick) as f64 / setup.rate));
        // Catch up after a slow commit, so the rate over the run is the one asked for.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        tick
    });
    let count_committed = |events: u64| {
        if let Some(window) = &setup.window {
            window.committed.fetch_add(events, Ordering::Relaxed);
        }
    };
    let mut log = WriterLog { events: 0, expected: 0, commits: Vec::new() };
    let mut k = w;
    let stopped = || setup.stop.as_ref().is_some_and(|stop| stop.load(Ordering::Relaxed));
    let enough = |events: u64| setup.count > 0 && events >= setup.count;
    while started.elapsed() < setup.duration && !stopped() && !enough(log.events) {
        if let Some(tick) = &mut tick {
            // A slow rate's next tick can fall past the end: stop on time rather than one period late.
            if tokio::time::timeout_at(started + setup.duration, tick.tick()).await.is_err() {
                break;
            }
        }
        if let Some(window) = &setup.window {
            // Still ahead at the end of the run: stop here, or the last INSERT would overrun the window.
            if !window.wait(started + setup.duration).await {
                break;
            }
        }
        let mut recipient = k % n;
        k += writers;
        match setup.mode {
            Mode::Produce => {
                let recipients = Some(vec![format!("u{recipient}")]);
                client.execute(statement, &[&recipients]).await.map_err(|e| e.to_string())?;
            }
            Mode::Targeted | Mode::Topic if per_tick > 1 => {
                // Events K, K + W, … in one statement: the users one row per statement would reach.
                let mut batch = vec![recipient];
                for _ in 1..per_tick {
                    batch.push(k % n);
                    k += writers;
                }
                let users: Vec<String> = batch.iter().map(|r| format!("u{r}")).collect();
                let targeted = setup.mode == Mode::Targeted;
                let rows = client.query(statement, &[&users, &targeted]).await.map_err(|e| e.to_string())?;
                let committed = now_us();
                log.commits.extend(rows.iter().map(|row| (row.get(0), committed)));
                log.expected += batch.iter().filter(|&&r| expected(r)).count() as u64;
                count_committed(rows.len() as u64);
                log.events += rows.len() as u64;
                continue;
            }
            Mode::Targeted | Mode::Topic => {
                let recipients = (setup.mode == Mode::Targeted).then(|| vec![format!("u{recipient}")]);
                let row = client.query_one(statement, &[&recipients]).await.map_err(|e| e.to_string())?;
                // The statement's implicit transaction has committed when its reply arrives.
                log.commits.push((row.get(0), now_us()));
                if expected(recipient) {
                    log.expected += 1;
                }
                count_committed(1);
            }
            Mode::Wakeup => {
                let sinks = setup.sinks.as_deref().ok_or("wakeup mode needs the connections in this process")?;
                // Only a connection that is open and reading can send the wakeup and receive the event: skip
                // stalled and failed ones (their events are not written, so not expected either).
                let mut tries = 0;
                while sinks.get(recipient).is_none_or(Option::is_none) {
                    tries += 1;
                    if tries > n {
                        return Err("no live connection to send wakeups on".into());
                    }
                    recipient = k % n;
                    k += writers;
                }
                let Some(Some(sink)) = sinks.get(recipient) else { continue };
                let read = |counters: &[Arc<AtomicU64>]| counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                let before: u64 = setup.closed_loop.as_ref().map_or(0, |(_, counters)| read(counters));
                let recipients = Some(vec![format!("u{recipient}")]);
                let row = client.query_one(statement, &[&recipients]).await.map_err(|e| e.to_string())?;
                {
                    let mut sink = sink.lock().await;
                    // Latency is measured from here: the client sending its wakeup for a row already committed.
                    let sent_us = now_us();
                    sink.send(wakeup_message()).await.map_err(|e| format!("sending wakeup: {e}"))?;
                    log.commits.push((row.get(0), sent_us));
                    log.expected += 1;
                }
                if let Some((pause, counters)) = &setup.closed_loop {
                    // The reader records the receive time itself: this poll only paces the loop.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while read(counters) <= before && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    tokio::time::sleep(*pause).await;
                }
            }
            Mode::Backlog | Mode::Saturate | Mode::History | Mode::Storm | Mode::Floor => {
                return Err("no writers in this mode".into())
            }
        }
        log.events += 1;
    }
    Ok(log)
}

pub struct Backlog {
    /// Every inserted id with t0 (the COMMIT's return) as its reference time.
    pub commits: Vec<(i64, u64)>,
    pub t0_us: u64,
    pub insert_secs: f64,
    pub expected: u64,
}

/// Insert `rows` targeted events (row g to user u{g mod N}) in one transaction without waking nudge.
pub async fn insert_backlog(
    database_url: &str,
    rows: u64,
    connections: usize,
    stalled: usize,
) -> Result<Backlog, String> {
    let mut client = connect(database_url).await?;
    client
        .batch_execute("SET session_replication_role = replica")
        .await
        .map_err(|e| format!("SET session_replication_role (needs a superuser): {e}"))?;
    let n = connections.max(1) as i64;
    let started = Instant::now();
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let inserted = tx
        .query(
            "INSERT INTO nudge.events (topic, kind, recipients, data) \
             SELECT 'bench', 'bench.event', ARRAY['u' || (g % $1::bigint)], '{\"bench\": true}' \
             FROM generate_series(0::bigint, $2::bigint - 1) AS g ORDER BY g RETURNING id",
            &[&n, &(rows as i64)],
        )
        .await
        .map_err(|e| format!("inserting the backlog: {e}"))?;
    tx.commit().await.map_err(|e| format!("committing the backlog: {e}"))?;
    let t0_us = now_us();
    let insert_secs = started.elapsed().as_secs_f64();
    let commits = inserted.iter().map(|row| (row.get::<_, i64>(0), t0_us)).collect();
    let expected = (0..rows).filter(|g| !is_stalled((*g % n as u64) as usize, connections, stalled)).count() as u64;
    Ok(Backlog { commits, t0_us, insert_secs, expected })
}

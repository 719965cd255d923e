//! The join of the table and the live stream: what a connection reads from `nudge.events` (a client's `resume`,
//! a slow consumer's catch-up) and how it meets the frames the hub queues for it.
//!
//! **The rule.** At one instant the hub's cursor splits a connection's events in two: those at or below it come
//! from the table, read by seq; those above it come live, through the connection's outbox. For a catch-up that
//! instant is `Hub::rejoin`, under the hub's write lock, so no batch is half routed: every event up to the cursor
//! was refused by the outbox, every later one is queued. For a `resume` it is when the request is served: the
//! connection subscribed before (under the write lock too), so an event routed since then is both in the table
//! and queued or already written live; the replay leaves out the ones already written, and queued ones at or
//! below the cursor are dropped when their turn comes. [`Written`] is what the join remembers of one
//! connection: the highest seq it wrote, and, until it resumes, the seqs of the live events it wrote.
//!
//! **Invariants**, per connection:
//! - *No event written twice.* A live frame at or below the highest seq written is dropped ([`Written::admit`]),
//!   and a `resume` leaves out the live events written before it.
//! - *None skipped.* A table read covers the whole range (since, cursor]; the live stream holds everything after.
//!   When the join cannot keep that promise it says so, never silently: `resume` answers `complete: false` (the
//!   client refetches), a catch-up whose events were deleted after the retention closes with 1013 (the client
//!   reconnects and resumes).
//! - *Seq order.* The table is read in seq order, and the highest seq written only grows, so what follows a read
//!   is above it. The one exception is the protocol's: live events a connection wrote before its `resume` may be
//!   above events the replay then writes, which is why `resume` belongs right after subscribing.
//!
//! Reads go through [`History`], so the join can be tested on rows made up in memory; [`Replays`] is the real
//! one: the queries of `db/events.rs` on a pool of their own, under the statement timeout.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::time::Instant;

use crate::db;
use crate::db::events::{self, Replay};
use crate::hub::{self, Frame, Hub};
use crate::outbox::Outbox;

/// Events one `resume` replays at most; beyond that the reply says `complete: false` and the client refetches.
pub const RESUME_LIMIT: i64 = 1000;

/// A `resume` whose replay (waiting for a connection of the replay pool included) takes longer answers
/// `complete: false` with what it has not got: the client refetches rather than waits.
pub const RESUME_DEADLINE: Duration = Duration::from_secs(4);

/// How long a `resume` waits for a node that has just started to read its cursor: without a cursor there is no
/// split between table and live stream, and the answer is `complete: false`.
const CURSOR_WAIT: Duration = Duration::from_secs(5);

/// Live events remembered per connection for a later `resume`: the client sends `resume` right after
/// subscribing, so a few are the norm, and every byte of [`Written`] is multiplied by the connection count.
const SENT_BEFORE_RESUME: usize = 64;

/// Where the join reads one user's events in (since, until]: the table, or rows made up by a test.
pub trait History: Sync {
    /// The events of `user` (personal ones, and those on `topics`) in (since, until], at most `limit`, in seq
    /// order, with the range's verdict ([`Replay`]: complete or not, and how far it reached).
    fn read(
        &self,
        user: &str,
        topics: &[&str],
        since: i64,
        until: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Replay, db::QueryError>> + Send;
}

/// The table, as replays read it.
pub struct Replays {
    /// A pool of its own (`NUDGE_REPLAY_POOL_SIZE`): a storm of resumes queues behind itself, never in front of
    /// claims and live delivery.
    pool: Pool,
    /// `NUDGE_STATEMENT_TIMEOUT`, per query: a silent database session must not hold a connection task forever.
    statement_timeout: Duration,
}

impl Replays {
    /// `pool` should be the replay pool, apart from the relay's: see the field.
    pub fn new(pool: Pool, statement_timeout: Duration) -> Self {
        Replays { pool, statement_timeout }
    }
}

impl History for Replays {
    async fn read(
        &self,
        user: &str,
        topics: &[&str],
        since: i64,
        until: i64,
        limit: i64,
    ) -> Result<Replay, db::QueryError> {
        let query = events::replay(&self.pool, user, topics, since, until, limit);
        db::within(&self.pool, self.statement_timeout, query).await
    }
}

/// What one connection has written, as far as the join needs to know.
#[derive(Debug)]
pub struct Written {
    /// Highest seq written to the socket: live frames at or below it were already written by a replay or a
    /// catch-up, and a catch-up reads from here.
    last: i64,
    /// Live events written before a `resume`, which its replay leaves out.
    before_resume: BeforeResume,
    /// `resume` is accepted once: a second replay could not know what the first one wrote.
    resumed: bool,
}

/// What a connection remembers of its live events until it resumes.
#[derive(Debug)]
enum BeforeResume {
    /// At most `SENT_BEFORE_RESUME`, in the order written; searched linearly, once, by the replay.
    Seqs(Vec<i64>),
    /// More than `SENT_BEFORE_RESUME` were written, or a catch-up wrote from the table: a later `resume` cannot
    /// tell which events it would repeat.
    Unknown,
}

impl Default for Written {
    fn default() -> Self {
        Written { last: 0, before_resume: BeforeResume::Seqs(Vec::new()), resumed: false }
    }
}

impl Written {
    /// Whether a live frame with this seq is still to be written. If it is, it counts as written from now on:
    /// the caller writes it or the connection ends.
    pub fn admit(&mut self, seq: i64) -> bool {
        if seq <= self.last {
            return false;
        }
        if let (false, BeforeResume::Seqs(seqs)) = (self.resumed, &mut self.before_resume) {
            if seqs.len() < SENT_BEFORE_RESUME {
                seqs.push(seq);
            } else {
                self.before_resume = BeforeResume::Unknown;
            }
        }
        self.last = seq;
        true
    }

    /// This connection has sent `resume` already.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Everything up to `seq` counts as written (a replay covered it).
    fn covered(&mut self, seq: i64) {
        self.last = self.last.max(seq);
    }
}

/// What to write for a `resume`, and what to answer after it.
#[derive(Debug)]
pub struct Resumed {
    /// The replayed events, in seq order, none of them already written.
    pub frames: Vec<Frame>,
    /// Where the replay stopped and the live stream takes over.
    pub until: i64,
    /// False when the client must refetch: see `docs/protocol.md`.
    pub complete: bool,
}

/// Replay `user`'s events in (since, cursor] that this connection has not written, and mark the live frames the
/// replay covers as written. The caller has checked that the connection has not resumed before.
///
/// The range ends at the node cursor: everything above it is live. A connection that wrote too many live events
/// to remember them cannot know what a replay would repeat, so it replays nothing and answers `complete: false`;
/// so does a node that has not read its cursor yet, and a replay that fails or misses `RESUME_DEADLINE`: the
/// client refetching is always correct.
pub async fn resume<H: History>(
    history: &H,
    hub: &Hub,
    written: &mut Written,
    user: &str,
    topics: &[&str],
    since: i64,
) -> Resumed {
    written.resumed = true;
    let Some(cursor) = started_cursor(hub).await else {
        return Resumed { frames: Vec::new(), until: since, complete: false };
    };
    let (until, already_written, known) = match std::mem::replace(&mut written.before_resume, BeforeResume::Unknown) {
        BeforeResume::Seqs(seqs) => (cursor, seqs, true),
        BeforeResume::Unknown => (since, Vec::new(), false),
    };
    // Waiting for a connection of the replay pool counts too: under a storm of resumes each client still hears
    // back soon.
    let read = history.read(user, topics, since, until, RESUME_LIMIT);
    let replay =
        tokio::time::timeout(RESUME_DEADLINE, read).await.unwrap_or(Err(db::QueryError::Timeout(RESUME_DEADLINE)));
    let (events, complete, skip_through) = match replay {
        Ok(replay) => (replay.events, replay.complete && known, replay.skip_through),
        Err(e) => {
            tracing::warn!(user = %user, "resume replay failed: {e}");
            (Vec::new(), false, until)
        }
    };
    let frames =
        events.iter().filter(|event| !already_written.contains(&event.seq)).map(|e| hub::encode(e, None)).collect();
    // Live frames still queued at or below `skip_through` were matched by the replay's range: dropped when
    // their turn comes. (`skip_through` is above the cursor when the client saw more than this node routed.)
    written.covered(skip_through);
    Resumed { frames, until, complete }
}

/// The node cursor, once the node has read its starting position; waits a little for a node that just started.
async fn started_cursor(hub: &Hub) -> Option<i64> {
    let deadline = Instant::now() + CURSOR_WAIT;
    loop {
        let value = hub.cursor();
        if value >= 0 {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A slow consumer's way back: its outbox refused live frames, so it reads what it missed from the table, one
/// chunk at a time, up to the cursor at which it rejoined the live stream.
#[derive(Debug)]
pub struct CatchUp {
    /// The hub's cursor when the outbox took live frames again: the table supplies everything up to here.
    until: i64,
    /// Events per read: a queue's worth, so a connection behind holds no more than one that is not.
    chunk: i64,
}

/// The next step of a catch-up.
#[derive(Debug)]
pub enum Chunk {
    /// Write these, then ask for the next chunk.
    Write(Vec<Frame>),
    /// The table has nothing more below the live stream: go back to the outbox.
    Done,
    /// The connection cannot catch up (the reason, for its close frame): close with 1013, and the client
    /// reconnects and resumes.
    Lost(&'static str),
}

impl CatchUp {
    /// Put the outbox back on the live stream (`Hub::rejoin`): live frames queued from now on are all above the
    /// returned cursor, and everything from what this connection wrote last up to it is read from the table.
    /// If the queue overflows again meanwhile, the outbox falls behind again and, once drained, starts another.
    pub fn start(hub: &Hub, outbox: &Outbox, written: &mut Written, queue: usize) -> CatchUp {
        let until = hub.rejoin(outbox);
        // What a catch-up writes is not remembered seq by seq: a later `resume` replays nothing (incomplete).
        written.before_resume = BeforeResume::Unknown;
        CatchUp { until, chunk: queue.max(1) as i64 }
    }

    /// Read the next chunk after what this connection wrote last, and count it as written: the caller writes it
    /// or the connection ends.
    pub async fn next<H: History>(&self, history: &H, written: &mut Written, user: &str, topics: &[&str]) -> Chunk {
        let since = written.last;
        if since >= self.until {
            return Chunk::Done;
        }
        let replay = match history.read(user, topics, since, self.until, self.chunk).await {
            Ok(replay) => replay,
            Err(e) => {
                tracing::warn!(user = %user, "catch-up failed, closing the connection (it can resume): {e}");
                return Chunk::Lost("could not catch up");
            }
        };
        if replay.events.is_empty() && !replay.complete {
            // Deleted after the retention while this connection was behind: it must refetch.
            return Chunk::Lost("fell behind the retention");
        }
        let frames: Vec<Frame> = replay.events.iter().map(|e| hub::encode(e, None)).collect();
        // Nothing else of this connection's lies below `reached`: the next chunk starts there.
        let last = frames.last().map_or(replay.reached, |f| f.seq.max(replay.reached));
        written.covered(last);
        Chunk::Write(frames)
    }
}

#[cfg(test)]
impl Replays {
    /// A pool that never connects: for tests that need a `Replays` and never replay.
    pub(crate) fn unconnected() -> Self {
        let config: crate::db::Database = "host=127.0.0.1 user=x dbname=x".parse().expect("config");
        Replays::new(crate::db::pool(&config, 1).expect("pool"), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::db::events::Event;
    use crate::health::Metrics;
    use crate::outbox::Next;

    /// What a read does besides answering.
    enum Fault {
        Fails,
        TakesLonger(Duration),
    }

    /// One user's events in memory, answering as `events::replay` does (docs/protocol.md's `resume`), and
    /// remembering every read it was asked for as (since, until, limit).
    struct Table {
        /// The user's events.
        seqs: Vec<i64>,
        /// The oldest seq still stored: everything below was deleted after the retention.
        oldest: i64,
        /// The cluster's last seq.
        last: i64,
        fault: Option<Fault>,
        reads: Mutex<Vec<(i64, i64, i64)>>,
    }

    impl Table {
        fn new(seqs: impl IntoIterator<Item = i64>) -> Self {
            let seqs: Vec<i64> = seqs.into_iter().collect();
            let last = seqs.last().copied().unwrap_or(0);
            Table { seqs, oldest: 1, last, fault: None, reads: Mutex::default() }
        }

        fn reads(&self) -> Vec<(i64, i64, i64)> {
            self.reads.lock().unwrap().clone()
        }
    }

    impl History for Table {
        async fn read(
            &self,
            _: &str,
            _: &[&str],
            since: i64,
            until: i64,
            limit: i64,
        ) -> Result<Replay, db::QueryError> {
            self.reads.lock().unwrap().push((since, until, limit));
            match self.fault {
                Some(Fault::Fails) => return Err(db::QueryError::Timeout(Duration::from_secs(1))),
                Some(Fault::TakesLonger(delay)) => tokio::time::sleep(delay).await,
                None => {}
            }
            let nothing =
                |complete, skip_through| Replay { events: Vec::new(), complete, skip_through, reached: until };
            if since > self.last {
                return Ok(nothing(false, until));
            }
            if since >= until {
                return Ok(nothing(true, since));
            }
            if since + 1 < self.oldest {
                return Ok(nothing(false, until));
            }
            let mut events: Vec<Event> =
                self.seqs.iter().filter(|&&seq| seq > since && seq <= until).map(|&seq| event(seq)).collect();
            let truncated = events.len() as i64 > limit;
            events.truncate(limit as usize);
            let reached = if truncated { events.last().map_or(until, |e| e.seq) } else { until };
            Ok(Replay { events, complete: !truncated, skip_through: until, reached })
        }
    }

    fn event(seq: i64) -> Event {
        Event::sample(seq, "t", Some(&["alice"]))
    }

    fn seqs(frames: &[Frame]) -> Vec<i64> {
        frames.iter().map(|f| f.seq).collect()
    }

    fn hub_at(cursor: i64) -> Hub {
        let hub = Hub::new();
        hub.start_at(cursor);
        hub
    }

    /// Live frames written before the resume, as the connection writes them.
    fn written_live(seqs: impl IntoIterator<Item = i64>) -> Written {
        let mut written = Written::default();
        for seq in seqs {
            assert!(written.admit(seq));
        }
        written
    }

    async fn resume_since(table: &Table, hub: &Hub, written: &mut Written, since: i64) -> Resumed {
        resume(table, hub, written, "alice", &["t"], since).await
    }

    #[tokio::test]
    async fn resume_replays_up_to_the_cursor_leaving_out_live_events_already_written() {
        let table = Table::new([3, 4, 5, 7, 9, 12]);
        let mut written = written_live([4, 7]);
        let resumed = resume_since(&table, &hub_at(10), &mut written, 2).await;
        assert_eq!(table.reads(), [(2, 10, RESUME_LIMIT)]);
        assert_eq!(seqs(&resumed.frames), [3, 5, 9]);
        assert_eq!((resumed.until, resumed.complete), (10, true));
        assert!(written.resumed());
        // Frames still queued up to the cursor were replayed; the live stream takes over above it.
        assert!(!written.admit(9));
        assert!(!written.admit(10));
        assert!(written.admit(12));
    }

    #[tokio::test]
    async fn resume_after_more_live_events_than_remembered_replays_nothing_and_is_incomplete() {
        let table = Table::new(1..=70);
        // 64 are remembered: the replay still knows what it would repeat.
        let mut written = written_live(1..=64);
        let resumed = resume_since(&table, &hub_at(66), &mut written, 0).await;
        assert_eq!((seqs(&resumed.frames), resumed.until, resumed.complete), (vec![65, 66], 66, true));

        // 65 are not: the range shrinks to nothing, and queued live frames are written as they come.
        let table = Table::new(1..=70);
        let mut written = written_live(1..=65);
        let resumed = resume_since(&table, &hub_at(66), &mut written, 0).await;
        assert_eq!(table.reads(), [(0, 0, RESUME_LIMIT)]);
        assert_eq!((resumed.frames.len(), resumed.until, resumed.complete), (0, 0, false));
        assert!(written.admit(66));
    }

    #[tokio::test]
    async fn a_client_ahead_of_this_node_gets_no_replay_and_no_live_frame_it_has_seen() {
        let table = Table::new([8, 12, 15, 18]);
        let mut written = Written::default();
        // The client saw up to 15 on a faster node; this node has routed up to 10.
        let resumed = resume_since(&table, &hub_at(10), &mut written, 15).await;
        assert_eq!((resumed.frames.len(), resumed.until, resumed.complete), (0, 10, true));
        assert!(!written.admit(12));
        assert!(!written.admit(15));
        assert!(written.admit(18));
    }

    #[tokio::test]
    async fn resume_past_the_retention_or_beyond_the_limit_is_incomplete() {
        let mut table = Table::new(50..=60);
        table.oldest = 50;
        let mut written = Written::default();
        let resumed = resume_since(&table, &hub_at(60), &mut written, 10).await;
        assert_eq!((resumed.frames.len(), resumed.complete), (0, false));
        // The client refetches: frames queued up to the cursor would only repeat what it fetches.
        assert!(!written.admit(60));

        let table = Table::new(1..=1500);
        let mut written = Written::default();
        let resumed = resume_since(&table, &hub_at(1500), &mut written, 0).await;
        assert_eq!(resumed.frames.len() as i64, RESUME_LIMIT);
        assert_eq!(resumed.frames.last().map(|f| f.seq), Some(RESUME_LIMIT));
        assert!(!resumed.complete);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_or_slow_replay_answers_incomplete_at_the_deadline() {
        let mut table = Table::new(1..=5);
        table.fault = Some(Fault::Fails);
        let mut written = Written::default();
        let resumed = resume_since(&table, &hub_at(5), &mut written, 0).await;
        assert_eq!((resumed.frames.len(), resumed.until, resumed.complete), (0, 5, false));
        assert!(!written.admit(5));

        table.fault = Some(Fault::TakesLonger(Duration::from_secs(60)));
        let mut written = Written::default();
        let started = Instant::now();
        let resumed = resume_since(&table, &hub_at(5), &mut written, 0).await;
        assert!(started.elapsed() >= RESUME_DEADLINE && started.elapsed() < Duration::from_secs(60));
        assert_eq!((resumed.frames.len(), resumed.complete), (0, false));
    }

    #[tokio::test(start_paused = true)]
    async fn resume_on_a_node_without_a_cursor_waits_then_answers_incomplete_without_reading() {
        let table = Table::new(1..=5);
        let mut written = written_live([3]);
        let started = Instant::now();
        let resumed = resume(&table, &Hub::new(), &mut written, "alice", &[], 1).await;
        assert!(started.elapsed() >= CURSOR_WAIT);
        assert_eq!((resumed.frames.len(), resumed.until, resumed.complete), (0, 1, false));
        assert!(table.reads().is_empty());
        assert!(written.resumed());
    }

    #[tokio::test]
    async fn a_catch_up_reads_what_was_refused_a_queue_at_a_time_then_the_live_stream_follows() {
        let hub = Hub::new();
        let metrics = Metrics::default();
        let (_id, outbox) = hub.register(&"alice".into(), 2);
        let live = |range: std::ops::RangeInclusive<i64>| range.map(event).collect::<Vec<_>>();
        hub.route(&live(1..=5), None, &metrics);
        let mut written = Written::default();
        let mut queued = Vec::new();
        outbox.pop_many(&mut queued, 10);
        assert!(queued.iter().all(|frame| written.admit(frame.seq)));
        assert_eq!(outbox.next().await, Next::Behind);

        let table = Table::new(1..=5);
        let catch_up = CatchUp::start(&hub, &outbox, &mut written, 2);
        hub.route(&live(6..=6), None, &metrics);
        let mut chunks = Vec::new();
        loop {
            match catch_up.next(&table, &mut written, "alice", &[]).await {
                Chunk::Write(frames) => chunks.push(seqs(&frames)),
                Chunk::Done => break,
                Chunk::Lost(reason) => panic!("lost: {reason}"),
            }
        }
        assert_eq!(chunks, [vec![3, 4], vec![5]]);
        assert_eq!(table.reads(), [(2, 5, 2), (4, 5, 2)]);
        assert_eq!(outbox.next().await, Next::Frame(hub::encode(&event(6), None)));
        assert!(written.admit(6));

        // What the catch-up wrote is not remembered seq by seq: a later resume cannot be complete.
        let resumed = resume_since(&table, &hub, &mut written, 0).await;
        assert_eq!((resumed.frames.len(), resumed.complete), (0, false));
    }

    #[tokio::test]
    async fn a_catch_up_that_cannot_read_its_events_is_lost() {
        let hub = hub_at(20);
        let outbox = Outbox::new(1);
        let mut table = Table::new(10..=20);
        table.oldest = 10;
        let mut written = written_live([2]);
        let catch_up = CatchUp::start(&hub, &outbox, &mut written, 8);
        assert!(matches!(
            catch_up.next(&table, &mut written, "alice", &[]).await,
            Chunk::Lost("fell behind the retention")
        ));

        table.fault = Some(Fault::Fails);
        assert!(matches!(catch_up.next(&table, &mut written, "alice", &[]).await, Chunk::Lost("could not catch up")));
        // Nothing counts as written: the connection closes, and the client resumes from what it got.
        assert!(written.admit(3));
    }
}

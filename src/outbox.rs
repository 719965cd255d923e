//! `Outbox`: one connection's bounded queue of event frames, from the hub (one producer) to the connection task
//! (one consumer).
//!
//! Why not `tokio::sync::mpsc`: a tokio channel allocates its first block of 32 slots (about 1.3 KiB here) when it
//! is created, and every idle connection has one. An `Outbox` is a mutex around a `VecDeque` that allocates only
//! when frames are queued and gives the memory back when it drains, so an idle connection's queue costs ~150 bytes.
//! One producer and one consumer mean `Notify::notify_one`'s stored permit is enough: no wake-up is lost.
//!
//! **Overflow never waits and never loses.** Routing pushes what fits and, when a frame does not fit, marks the
//! outbox *behind*: from then on it takes no live frames at all, so the queue never holds a frame newer than a
//! dropped one. Every routed event is in `nudge.events` with its `seq`, so the connection, once it has written
//! what is queued, rejoins the live stream through `Hub::rejoin` and reads what it missed from the table past the
//! last seq it wrote (`replay::CatchUp`). Memory per connection stays bounded by `capacity`.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::hub::Frame;

pub struct Outbox {
    /// Frames, orders and the *behind* mark under one lock: a push and the mark it may set are one step.
    state: Mutex<State>,
    /// Wakes the connection: a frame was queued, the outbox fell behind, or it was closed.
    queued: Notify,
    /// `NUDGE_OUTBOUND_QUEUE`: what bounds a slow connection's memory.
    capacity: usize,
}

struct State {
    /// Live frames in seq order, written by the connection in batches.
    frames: VecDeque<Frame>,
    /// Orders from SQL (`nudge.disconnect`, `nudge.unsubscribe`), taken before any frame. Rare: empty, it does
    /// not allocate.
    control: Vec<Control>,
    /// A frame did not fit: live frames are refused until the connection has caught up from the table.
    behind: bool,
    /// When the oldest frame not yet written was queued, as the router's clock read it (`push`): the start of
    /// `nudge_routed_to_written_seconds`. Set on a push into a queue with none pending, cleared by
    /// `take_queued_at` once the queue is empty; frames left after a partial take keep the older instant.
    queued_at: Option<Instant>,
}

/// An order for one connection from a backend, through `nudge.disconnect()` / `nudge.unsubscribe()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Send `revoked` with this message and close with 4003.
    Revoke(String),
    /// Drop the subscriptions matching this pattern (a topic, or a prefix ending in `*`).
    Unsubscribe(String),
}

/// What the connection does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Control(Control),
    Frame(Frame),
    /// The queue is drained and frames were refused meanwhile: catch up from the table, then rejoin.
    Behind,
}

/// What one push did.
#[derive(Debug, PartialEq, Eq)]
pub struct Pushed {
    pub queued: usize,
    /// This push overflowed the queue (it was not behind before).
    pub fell_behind: bool,
}

/// A queue that outgrew this many slots is released when it drains, so a past burst does not stay resident.
const KEEP_CAPACITY: usize = 16;

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Outbox {
            state: Mutex::new(State { frames: VecDeque::new(), control: Vec::new(), behind: false, queued_at: None }),
            queued: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queue `frames` in order, with one lock and one wake-up; never waits. Fewer queued than given means the
    /// outbox is behind and the rest are for the catch-up to read from the table. `now` is the router's clock,
    /// read once per routed batch rather than once per connection.
    pub fn push(&self, frames: &[Frame], now: Instant) -> Pushed {
        let mut state = self.lock();
        if state.behind {
            return Pushed { queued: 0, fell_behind: false };
        }
        let room = self.capacity.saturating_sub(state.frames.len());
        let queued = frames.len().min(room);
        state.frames.extend(frames[..queued].iter().cloned());
        if queued > 0 && state.queued_at.is_none() {
            state.queued_at = Some(now);
        }
        let fell_behind = queued < frames.len();
        state.behind = fell_behind;
        drop(state);
        if queued > 0 || fell_behind {
            self.queued.notify_one();
        }
        Pushed { queued, fell_behind }
    }

    /// Move up to `max` queued frames into `into`, with one lock; returns how many.
    pub fn pop_many(&self, into: &mut Vec<Frame>, max: usize) -> usize {
        let mut state = self.lock();
        let n = state.frames.len().min(max);
        into.extend(state.frames.drain(..n));
        if state.frames.is_empty() && state.frames.capacity() > KEEP_CAPACITY {
            state.frames = VecDeque::new();
        }
        n
    }

    /// When the oldest frame taken since the last call was queued (see `State::queued_at`).
    pub fn take_queued_at(&self) -> Option<Instant> {
        let mut state = self.lock();
        if state.frames.is_empty() {
            state.queued_at.take()
        } else {
            state.queued_at
        }
    }

    /// The next thing to do, waiting for it: a frame, or a catch-up (queue drained while behind).
    pub async fn next(&self) -> Next {
        loop {
            let queued = self.queued.notified();
            {
                let mut state = self.lock();
                if !state.control.is_empty() {
                    return Next::Control(state.control.remove(0));
                }
                if let Some(frame) = state.frames.pop_front() {
                    if state.frames.is_empty() && state.frames.capacity() > KEEP_CAPACITY {
                        state.frames = VecDeque::new();
                    }
                    return Next::Frame(frame);
                }
                if state.behind {
                    return Next::Behind;
                }
            }
            queued.await;
        }
    }

    /// Take live frames again. Called by `Hub::rejoin` under the hub's write lock, so that no routing is half
    /// done: every batch up to the cursor it reads was refused whole, every later one is queued.
    pub(crate) fn resume_live(&self) {
        self.lock().behind = false;
    }

    /// Queue an order for the connection (ahead of its frames) and wake it.
    pub fn control(&self, order: Control) {
        self.lock().control.push(order);
        self.queued.notify_one();
    }

    /// Drop queued frames of `topic` (topic events only; personal events stay): called after the hub stopped
    /// routing the topic here, so that nothing of a revoked topic is written after `unsubscribed`.
    pub fn purge_topic(&self, topic: &str) {
        self.lock().frames.retain(|frame| frame.topic.as_deref() != Some(topic));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().frames.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding this lock; a poisoned queue is still a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: i64) -> Frame {
        Frame { seq, text: format!("{seq}").into(), topic: None }
    }

    fn on(topic: &str, seq: i64) -> Frame {
        Frame { seq, text: format!("{seq}").into(), topic: Some(topic.into()) }
    }

    fn queued(n: usize) -> Pushed {
        Pushed { queued: n, fell_behind: false }
    }

    #[tokio::test]
    async fn bounded_and_in_order() {
        let outbox = Outbox::new(2);
        assert_eq!(outbox.push(&[frame(1), frame(2)], Instant::now()), queued(2));
        assert_eq!(outbox.next().await, Next::Frame(frame(1)));
        assert_eq!(outbox.next().await, Next::Frame(frame(2)));
    }

    #[tokio::test]
    async fn an_overflow_refuses_every_later_frame_until_the_reader_rejoins() {
        let outbox = Outbox::new(3);
        assert_eq!(outbox.push(&[frame(1)], Instant::now()), queued(1));
        // 2 and 3 fit, 4 does not: behind, and 5 is refused although a pop makes room.
        assert_eq!(
            outbox.push(&[frame(2), frame(3), frame(4)], Instant::now()),
            Pushed { queued: 2, fell_behind: true }
        );
        assert_eq!(outbox.next().await, Next::Frame(frame(1)));
        assert_eq!(outbox.push(&[frame(5)], Instant::now()), queued(0));
        let mut popped = Vec::new();
        assert_eq!(outbox.pop_many(&mut popped, 10), 2);
        assert_eq!(popped.iter().map(|f| f.seq).collect::<Vec<_>>(), [2, 3]);
        // Drained while behind: the reader is told to catch up, not left waiting.
        assert_eq!(outbox.next().await, Next::Behind);
        outbox.resume_live();
        assert_eq!(outbox.push(&[frame(6)], Instant::now()), queued(1));
        assert_eq!(outbox.next().await, Next::Frame(frame(6)));
    }

    #[tokio::test]
    async fn a_reader_waiting_is_woken_by_falling_behind() {
        let outbox = std::sync::Arc::new(Outbox::new(1));
        let reader = {
            let outbox = outbox.clone();
            tokio::spawn(async move { (outbox.next().await, outbox.next().await) })
        };
        tokio::task::yield_now().await;
        assert_eq!(outbox.push(&[frame(1), frame(2)], Instant::now()), Pushed { queued: 1, fell_behind: true });
        assert_eq!(reader.await.expect("reader"), (Next::Frame(frame(1)), Next::Behind));
    }

    #[test]
    fn purging_a_topic_keeps_personal_frames_and_other_topics() {
        let outbox = Outbox::new(10);
        outbox.push(&[on("a", 1), frame(2), on("b", 3), on("a", 4)], Instant::now());
        outbox.purge_topic("a");
        let mut left = Vec::new();
        outbox.pop_many(&mut left, 10);
        assert_eq!(left.iter().map(|f| f.seq).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let outbox = Outbox::new(1000);
        let frames: Vec<_> = (0..500).map(frame).collect();
        assert_eq!(outbox.push(&frames, Instant::now()), queued(500));
        let mut popped = Vec::new();
        outbox.pop_many(&mut popped, 1000);
        assert_eq!(outbox.len(), 0);
        assert_eq!(outbox.lock().frames.capacity(), 0);
    }
}

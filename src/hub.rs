//! The hub: who is online on this node, by user and by topic, and the routing of claimed events to them.
//!
//! Each authenticated connection registers an `Outbox` (a bounded queue). Routing never blocks and never waits
//! for a socket: it serializes each event once and pushes the shared frame into every matching `Outbox`. An
//! outbox that stays full means the client is not reading; the hub unregisters and closes it, and the connection
//! closes itself with 1013 once it has written what is already queued.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::db::events::Event;
use crate::health::Metrics;
use crate::outbox::{Outbox, PushError};
use crate::protocol::EventFrame;

/// How long routing waits for a full outbox to make room before it decides the client is not reading.
pub const OVERFLOW_GRACE: Duration = Duration::from_millis(500);

/// One connection's id, unique for the life of the process.
pub type ConnId = u64;

/// A serialized event, cheap to clone: every recipient of an event shares one allocation. The seq travels with
/// it so a connection can drop what a `resume` replay already sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub seq: i64,
    pub text: Utf8Bytes,
}

pub struct Hub {
    maps: RwLock<Maps>,
    next_id: AtomicU64,
    /// The node's delivery cursor: the highest seq routed, -1 until the node read its starting position. It is
    /// advanced while the maps' read lock is still held, so a connection that subscribes (write lock) afterwards
    /// and asks to `resume` is told to replay that batch: no event falls between replay and live stream.
    cursor: AtomicI64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub { maps: RwLock::default(), next_id: AtomicU64::new(0), cursor: AtomicI64::new(-1) }
    }
}

#[derive(Default)]
struct Maps {
    outboxes: HashMap<ConnId, Arc<Outbox>>,
    /// A user's connections: tabs and devices, usually a handful, so a Vec beats a set.
    by_user: HashMap<Arc<str>, Vec<ConnId>>,
    /// A topic's subscribers: possibly thousands, removed one by one, so a set.
    by_topic: HashMap<Box<str>, HashSet<ConnId>>,
}

/// What a routing call did, for metrics and logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Routed {
    pub delivered: u64,
    /// Connections dropped because their outbox overflowed.
    pub overflowed: u64,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register an authenticated connection of `user`; its events arrive on the returned receiver.
    pub fn register(&self, user: &Arc<str>, queue: usize) -> (ConnId, Arc<Outbox>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new(queue));
        let mut maps = self.write();
        maps.outboxes.insert(id, outbox.clone());
        maps.by_user.entry(user.clone()).or_default().push(id);
        (id, outbox)
    }

    /// Remove a connection and all its subscriptions. Idempotent.
    pub fn unregister<'t>(&self, id: ConnId, user: &str, topics: impl IntoIterator<Item = &'t str>) {
        let mut maps = self.write();
        maps.outboxes.remove(&id);
        if let Some(conns) = maps.by_user.get_mut(user) {
            conns.retain(|c| *c != id);
            if conns.is_empty() {
                maps.by_user.remove(user);
            }
        }
        for topic in topics {
            maps.unsubscribe(id, topic);
        }
    }

    pub fn subscribe(&self, id: ConnId, topic: &str) {
        let mut maps = self.write();
        if maps.outboxes.contains_key(&id) {
            maps.by_topic.entry(topic.into()).or_default().insert(id);
        }
    }

    pub fn unsubscribe(&self, id: ConnId, topic: &str) {
        self.write().unsubscribe(id, topic);
    }

    /// Route one claimed batch, in order. Called by the relay after the claim transaction committed.
    ///
    /// Frames go into outboxes with `try_push` under the read lock. A connection whose outbox is full is not
    /// dropped at once: a claim batch can hold more events for one connection than its queue, and a client
    /// reading at full speed must not be punished for that. Its remaining frames of this batch are kept in
    /// order and sent after the lock is released, waiting for room for at most `OVERFLOW_GRACE`; a connection
    /// still full by then is not reading, and is dropped.
    pub async fn route(&self, events: &[Event], metrics: &Metrics) -> Routed {
        let mut routed = Routed::default();
        // Connections that were full at some point in this batch, with the frames they still have to get.
        let mut blocked: HashMap<ConnId, (Arc<Outbox>, Vec<Frame>)> = HashMap::new();
        {
            let maps = self.read();
            let mut push = |id: &ConnId, frames: &[Frame]| {
                if let Some((_, waiting)) = blocked.get_mut(id) {
                    // Behind earlier frames that are waiting: keep the order.
                    waiting.extend_from_slice(frames);
                    return;
                }
                let Some(outbox) = maps.outboxes.get(id) else { return };
                // Err is only Closed: the connection is on its way out.
                if let Ok(queued) = outbox.try_push_many(frames) {
                    routed.delivered += queued as u64;
                    if queued < frames.len() {
                        blocked.insert(*id, (outbox.clone(), frames[queued..].to_vec()));
                    }
                }
            };
            let mut rest = events;
            while let Some(event) = rest.first() {
                match &event.recipients {
                    Some(users) => {
                        let frame = [encode(event)];
                        for user in users {
                            for id in maps.by_user.get(user.as_str()).into_iter().flatten() {
                                push(id, &frame);
                            }
                        }
                        rest = &rest[1..];
                    }
                    None => {
                        // A run of events on one topic goes to each subscriber with one lock and one wake-up.
                        let run = rest.iter().take_while(|e| e.recipients.is_none() && e.topic == event.topic).count();
                        let frames: Vec<Frame> = rest[..run].iter().map(encode).collect();
                        for id in maps.by_topic.get(event.topic.as_str()).into_iter().flatten() {
                            push(id, &frames);
                        }
                        rest = &rest[run..];
                    }
                }
            }
            if let Some(last) = events.last() {
                self.cursor.store(last.seq, Ordering::SeqCst);
            }
        }
        if !blocked.is_empty() {
            let deadline = tokio::time::Instant::now() + OVERFLOW_GRACE;
            let waits = blocked.into_iter().map(|(id, (outbox, frames))| async move {
                let mut sent = 0u64;
                for frame in frames {
                    match outbox.push_until(frame, deadline).await {
                        Ok(()) => sent += 1,
                        Err(PushError::Closed) => return (id, sent, false),
                        Err(PushError::Full(_)) => return (id, sent, true),
                    }
                }
                (id, sent, false)
            });
            let mut overflowed = Vec::new();
            for (id, sent, stuck) in futures_util::future::join_all(waits).await {
                routed.delivered += sent;
                if stuck {
                    overflowed.push(id);
                }
            }
            if !overflowed.is_empty() {
                let mut maps = self.write();
                for id in &overflowed {
                    // Closing is the signal: the connection drains its queue, then closes with 1013.
                    if let Some(outbox) = maps.outboxes.remove(id) {
                        outbox.close();
                    }
                }
                routed.overflowed = overflowed.len() as u64;
            }
        }
        metrics.delivered.fetch_add(routed.delivered, Ordering::Relaxed);
        metrics.overflowed.fetch_add(routed.overflowed, Ordering::Relaxed);
        routed
    }

    /// The highest seq routed on this node (-1 before `start_at`).
    pub fn cursor(&self) -> i64 {
        self.cursor.load(Ordering::SeqCst)
    }

    /// Where a starting node begins: it delivers what is claimed after this seq.
    pub fn start_at(&self, seq: i64) {
        self.cursor.store(seq, Ordering::SeqCst);
    }

    pub fn connections(&self) -> usize {
        self.read().outboxes.len()
    }

    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters more than
        // losing every connection, so poisoning is ignored.
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Maps {
    fn unsubscribe(&mut self, id: ConnId, topic: &str) {
        if let Some(subscribers) = self.by_topic.get_mut(topic) {
            subscribers.remove(&id);
            if subscribers.is_empty() {
                self.by_topic.remove(topic);
            }
        }
    }
}

/// The event frame exactly as clients receive it (also used for `resume` replays, written outside the hub).
pub fn encode(event: &Event) -> Frame {
    let frame = EventFrame {
        frame_type: "event",
        id: event.id,
        seq: event.seq,
        topic: &event.topic,
        kind: &event.kind,
        at: &event.at,
        data: &event.data,
    };
    // Serializing borrowed strings and a RawValue cannot fail.
    Frame { seq: event.seq, text: serde_json::to_string(&frame).unwrap_or_default().into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn event(id: i64, topic: &str, recipients: Option<&[&str]>) -> Event {
        Event {
            seq: id,
            id,
            topic: topic.into(),
            kind: "k".into(),
            at: "2026-11-25T10:00:00.000Z".into(),
            recipients: recipients.map(|r| r.iter().map(|s| s.to_string()).collect()),
            data: RawValue::from_string("{}".into()).expect("json"),
        }
    }

    #[tokio::test]
    async fn routes_personal_events_to_every_connection_of_the_user_and_topic_events_to_subscribers() {
        let hub = Hub::new();
        let metrics = Metrics::default();
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        let (a1, rx_a1) = hub.register(&alice, 8);
        let (_a2, rx_a2) = hub.register(&alice, 8);
        let (b1, rx_b1) = hub.register(&bob, 8);
        hub.subscribe(b1, "post:1");
        hub.subscribe(a1, "post:2");

        let routed = hub.route(&[event(1, "x", Some(&["alice"])), event(2, "post:1", None)], &metrics).await;
        assert_eq!(routed, Routed { delivered: 3, overflowed: 0 });
        assert!(rx_a1.try_pop().expect("a1").text.contains("\"id\":1"));
        assert!(rx_a2.try_pop().expect("a2").text.contains("\"id\":1"));
        assert!(rx_b1.try_pop().expect("b1").text.contains("\"id\":2"));
        assert!(rx_a1.try_pop().is_none());

        hub.unregister(a1, "alice", ["post:2"]);
        assert_eq!(hub.route(&[event(3, "post:2", None)], &metrics).await.delivered, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_that_stays_full_is_dropped_not_grown() {
        let hub = Hub::new();
        let metrics = Metrics::default();
        let user: Arc<str> = "u".into();
        let (_id, rx) = hub.register(&user, 2);
        let events: Vec<_> = (1..=3).map(|i| event(i, "t", Some(&["u"]))).collect();
        // Nobody reads: after the grace period the connection is dropped, with the queue still at its cap.
        assert_eq!(hub.route(&events, &metrics).await, Routed { delivered: 2, overflowed: 1 });
        assert!(rx.try_pop().is_some());
        assert!(rx.try_pop().is_some());
        // Closed: the connection sees the end of its queue and closes with 1013.
        assert!(rx.pop().await.is_none());
    }

    #[tokio::test]
    async fn a_reader_keeping_up_gets_a_batch_larger_than_its_queue_in_order() {
        let hub = Arc::new(Hub::new());
        let metrics = Metrics::default();
        let user: Arc<str> = "u".into();
        let (_id, rx) = hub.register(&user, 4);
        let reader = tokio::spawn(async move {
            let mut ids = Vec::new();
            while ids.len() < 100 {
                let Some(frame) = rx.pop().await else { break };
                let value: serde_json::Value = serde_json::from_str(&frame.text).expect("json");
                ids.push(value["id"].as_i64().expect("id"));
            }
            ids
        });
        let events: Vec<_> = (1..=100).map(|i| event(i, "t", Some(&["u"]))).collect();
        assert_eq!(hub.route(&events, &metrics).await, Routed { delivered: 100, overflowed: 0 });
        assert_eq!(reader.await.expect("reader"), (1..=100).collect::<Vec<_>>());
    }
}

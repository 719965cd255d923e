//! The hub: who is online on this node, by user and by topic, and the routing of claimed events to them.
//!
//! Each authenticated connection registers an `Outbox` (a bounded queue). Routing never blocks and never waits
//! for a socket: it serializes each event once and pushes the shared frame into every matching `Outbox` with
//! `Outbox::push`. An outbox that overflows falls *behind* (outbox.rs): it refuses live frames until its
//! connection has read what it missed from the table and `rejoin`ed, so a slow client costs nobody else anything.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::db::events::Event;
use crate::health::Metrics;
use crate::outbox::{Control, Outbox};
use crate::presence::{PresenceBook, UserRows};
use crate::protocol::EventFrame;

/// One connection's id, unique for the life of the process.
pub type ConnId = u64;

/// A serialized event, cheap to clone: every recipient of an event shares one allocation. The seq travels with
/// it so a connection can drop what a `resume` replay or a catch-up already sent; the topic (topic events only)
/// so that an `unsubscribe` can purge what is still queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub seq: i64,
    pub text: Utf8Bytes,
    pub topic: Option<Arc<str>>,
}

pub struct Hub {
    /// Read-locked while routing, write-locked to change who is online: a subscribe or a rejoin never sees a
    /// batch half routed.
    maps: RwLock<Maps>,
    /// Connection ids are never reused, so a late `unregister` cannot remove a newer connection.
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

/// One registered connection.
struct Registered {
    /// Where routing pushes this connection's frames and orders.
    outbox: Arc<Outbox>,
    /// Whose connection this is: `unregister` and presence find the user's entries by it.
    user: Arc<str>,
    /// When it authenticated: presence's `since`.
    opened: std::time::SystemTime,
}

#[derive(Default)]
struct Maps {
    /// Every registered connection, by id.
    outboxes: HashMap<ConnId, Registered>,
    /// A user's connections: tabs and devices, usually a handful, so a Vec beats a set.
    by_user: HashMap<Arc<str>, Vec<ConnId>>,
    /// A topic's subscribers: possibly thousands, removed one by one, so a set.
    by_topic: HashMap<Box<str>, HashSet<ConnId>>,
    /// Who is online here, for `nudge.presence` (presence.rs); changed only under the write lock, with the maps.
    presence: PresenceBook,
}

/// What a routing call did, for metrics and logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Routed {
    /// Frames queued.
    pub delivered: u64,
    /// Connections whose outbox overflowed in this batch: they catch up from the table.
    pub fell_behind: u64,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register an authenticated connection of `user`; its events arrive in the returned outbox.
    pub fn register(&self, user: &Arc<str>, queue: usize) -> (ConnId, Arc<Outbox>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new(queue));
        let opened = std::time::SystemTime::now();
        let mut maps = self.write();
        maps.outboxes.insert(id, Registered { outbox: outbox.clone(), user: user.clone(), opened });
        maps.by_user.entry(user.clone()).or_default().push(id);
        maps.presence.opened(user, opened);
        (id, outbox)
    }

    /// Remove a connection and all its subscriptions. Idempotent.
    pub fn unregister<'t>(&self, id: ConnId, user: &str, topics: impl IntoIterator<Item = &'t str>) {
        let mut maps = self.write();
        for topic in topics {
            maps.unsubscribe(id, topic);
        }
        let Some(registered) = maps.outboxes.remove(&id) else { return };
        if let Some(conns) = maps.by_user.get_mut(user) {
            conns.retain(|c| *c != id);
            if conns.is_empty() {
                maps.by_user.remove(user);
            }
        }
        maps.presence.closed(&registered.user, registered.opened);
    }

    pub fn subscribe(&self, id: ConnId, topic: &str) {
        let mut maps = self.write();
        let Some(user) = maps.outboxes.get(&id).map(|r| r.user.clone()) else { return };
        if maps.by_topic.entry(topic.into()).or_default().insert(id) {
            maps.presence.subscribed(&user, topic);
        }
    }

    /// Send an order to every connection of `user` on this node; returns how many got it.
    pub fn control_user(&self, user: &str, order: &Control) -> usize {
        let maps = self.read();
        let conns = maps.by_user.get(user).map(Vec::as_slice).unwrap_or_default();
        for id in conns {
            if let Some(registered) = maps.outboxes.get(id) {
                registered.outbox.control(order.clone());
            }
        }
        conns.len()
    }

    /// What changed in presence since the last call (presence.rs).
    pub fn presence_changes(&self) -> Vec<UserRows> {
        self.write().presence.take_changes()
    }

    /// Everything present now is written again at the next flush.
    pub fn presence_rewrite(&self) {
        self.write().presence.mark_all_dirty();
    }

    pub fn unsubscribe(&self, id: ConnId, topic: &str) {
        self.write().unsubscribe(id, topic);
    }

    /// Route one claimed batch, in order, and advance the cursor to its last seq. Called by the relay under its
    /// routing turn (`relay/delivery.rs`), one batch at a time, in seq order. Never waits: see the module doc.
    ///
    /// `through` is the batch's last seq when its last rows could not be decoded (skipped, so `events` ends
    /// earlier): the cursor must still move past them.
    pub fn route(&self, events: &[Event], through: Option<i64>, metrics: &Metrics) -> Routed {
        let mut routed = Routed::default();
        let now = tokio::time::Instant::now();
        {
            let maps = self.read();
            let mut push = |id: &ConnId, frames: &[Frame]| {
                let Some(registered) = maps.outboxes.get(id) else { return };
                let pushed = registered.outbox.push(frames, now);
                routed.delivered += pushed.queued as u64;
                routed.fell_behind += u64::from(pushed.fell_behind);
            };
            let mut rest = events;
            while let Some(event) = rest.first() {
                match &event.recipients {
                    Some(users) => {
                        let frame = [encode(event, None)];
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
                        let topic: Arc<str> = event.topic.as_str().into();
                        let frames: Vec<Frame> = rest[..run].iter().map(|e| encode(e, Some(&topic))).collect();
                        for id in maps.by_topic.get(event.topic.as_str()).into_iter().flatten() {
                            push(id, &frames);
                        }
                        rest = &rest[run..];
                    }
                }
            }
            // Still under the read lock: a connection that subscribes or rejoins (write lock) afterwards sees
            // this batch as routed.
            if let Some(last) = events.last().map(|e| e.seq).max(through) {
                self.cursor.store(last, Ordering::SeqCst);
            }
        }
        metrics.delivered.fetch_add(routed.delivered, Ordering::Relaxed);
        metrics.fell_behind.fetch_add(routed.fell_behind, Ordering::Relaxed);
        routed
    }

    /// Put a connection that caught up back on the live stream; returns the cursor at that instant. Under the
    /// write lock no batch is half routed, so every event up to the returned seq was refused by this outbox (the
    /// caller reads it from the table) and every later one will be queued.
    pub fn rejoin(&self, outbox: &Outbox) -> i64 {
        let _maps = self.write();
        outbox.resume_live();
        self.cursor.load(Ordering::SeqCst)
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
        let Some(subscribers) = self.by_topic.get_mut(topic) else { return };
        let removed = subscribers.remove(&id);
        if subscribers.is_empty() {
            self.by_topic.remove(topic);
        }
        if removed {
            if let Some(registered) = self.outboxes.get(&id) {
                let user = registered.user.clone();
                self.presence.unsubscribed(&user, topic);
            }
        }
    }
}

/// The event frame exactly as clients receive it (also used for `resume` replays and catch-ups, written outside
/// the hub). `topic` is set for topic events routed to subscribers.
pub fn encode(event: &Event, topic: Option<&Arc<str>>) -> Frame {
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
    Frame { seq: event.seq, text: serde_json::to_string(&frame).unwrap_or_default().into(), topic: topic.cloned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, topic: &str, recipients: Option<&[&str]>) -> Event {
        Event::sample(id, topic, recipients)
    }

    fn ids(outbox: &Outbox) -> Vec<i64> {
        let mut frames = Vec::new();
        outbox.pop_many(&mut frames, usize::MAX);
        frames.iter().map(|f| f.seq).collect()
    }

    #[test]
    fn routes_personal_events_to_every_connection_of_the_user_and_topic_events_to_subscribers() {
        let hub = Hub::new();
        let metrics = Metrics::default();
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        let (a1, rx_a1) = hub.register(&alice, 8);
        let (_a2, rx_a2) = hub.register(&alice, 8);
        let (b1, rx_b1) = hub.register(&bob, 8);
        hub.subscribe(b1, "post:1");
        hub.subscribe(a1, "post:2");

        let routed = hub.route(&[event(1, "x", Some(&["alice"])), event(2, "post:1", None)], None, &metrics);
        assert_eq!(routed, Routed { delivered: 3, fell_behind: 0 });
        assert_eq!((ids(&rx_a1), ids(&rx_a2), ids(&rx_b1)), (vec![1], vec![1], vec![2]));
        assert_eq!(hub.cursor(), 2);

        hub.unregister(a1, "alice", ["post:2"]);
        assert_eq!(hub.route(&[event(3, "post:2", None)], None, &metrics).delivered, 0);
    }

    #[tokio::test]
    async fn a_full_outbox_falls_behind_without_delaying_anyone_and_rejoins_at_the_cursor() {
        let hub = Hub::new();
        let metrics = Metrics::default();
        let (slow, fast): (Arc<str>, Arc<str>) = ("slow".into(), "fast".into());
        let (_s, slow_rx) = hub.register(&slow, 2);
        let (_f, fast_rx) = hub.register(&fast, 100);
        let events: Vec<_> = (1..=3).map(|i| event(i, "t", Some(&["slow", "fast"]))).collect();
        // Returns at once: nobody waits for the slow reader.
        assert_eq!(hub.route(&events, None, &metrics), Routed { delivered: 5, fell_behind: 1 });
        assert_eq!(ids(&fast_rx), [1, 2, 3]);
        // Behind: later events are refused whole, so the queue never holds a frame newer than a refused one.
        hub.route(&[event(4, "t", Some(&["slow"]))], None, &metrics);
        assert_eq!(ids(&slow_rx), [1, 2]);
        assert_eq!(slow_rx.next().await, crate::outbox::Next::Behind);
        // The catch-up rejoins at the cursor (4) and reads (2, 4] from the table; the next event is queued live.
        assert_eq!(hub.rejoin(&slow_rx), 4);
        hub.route(&[event(5, "t", Some(&["slow"]))], None, &metrics);
        assert_eq!(ids(&slow_rx), [5]);
    }

    #[test]
    fn skipped_rows_at_the_end_of_a_batch_still_advance_the_cursor() {
        let hub = Hub::new();
        let metrics = Metrics::default();
        hub.route(&[event(1, "t", None)], Some(3), &metrics);
        assert_eq!(hub.cursor(), 3);
        hub.route(&[], Some(5), &metrics);
        assert_eq!(hub.cursor(), 5);
    }
}

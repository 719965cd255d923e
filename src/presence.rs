//! Presence: who has authenticated connections on this node, and to which topics, kept as counts and written
//! to `nudge.presence_users` / `nudge.presence_topics` in batches (sql/0007_presence.sql).
//!
//! The hub updates the book under its own write lock whenever a connection registers, subscribes, unsubscribes
//! or leaves, and marks the user dirty. The writer (`Relay::run_presence`) takes the dirty users' current rows
//! every `FLUSH_EVERY` and writes them with two statements, whatever the number of connections that changed: a
//! storm of 15,000 connections opening costs a node four statements a second, and idle connections cost nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often dirty users are written: what bounds both the statement rate and the staleness of the views.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct PresenceBook {
    users: HashMap<Arc<str>, UserPresence>,
    dirty: HashSet<Arc<str>>,
}

#[derive(Default)]
struct UserPresence {
    /// When each open connection authenticated: the oldest is the user's `since`. A handful per user.
    opened: Vec<SystemTime>,
    /// Subscribed connections per topic.
    topics: HashMap<Box<str>, u32>,
}

/// One user's rows as they should be in the tables now; `connections == 0` means: delete them.
#[derive(Debug, PartialEq, Eq)]
pub struct UserRows {
    pub user: Arc<str>,
    pub connections: u32,
    pub since: Option<SystemTime>,
    pub topics: Vec<(Box<str>, u32)>,
}

impl PresenceBook {
    pub fn opened(&mut self, user: &Arc<str>, at: SystemTime) {
        self.users.entry(user.clone()).or_default().opened.push(at);
        self.dirty.insert(user.clone());
    }

    pub fn closed(&mut self, user: &Arc<str>, opened_at: SystemTime) {
        let Some(presence) = self.users.get_mut(user) else { return };
        if let Some(at) = presence.opened.iter().position(|t| *t == opened_at) {
            presence.opened.swap_remove(at);
        }
        if presence.opened.is_empty() {
            self.users.remove(user);
        }
        self.dirty.insert(user.clone());
    }

    pub fn subscribed(&mut self, user: &Arc<str>, topic: &str) {
        if let Some(presence) = self.users.get_mut(user) {
            *presence.topics.entry(topic.into()).or_insert(0) += 1;
            self.dirty.insert(user.clone());
        }
    }

    pub fn unsubscribed(&mut self, user: &Arc<str>, topic: &str) {
        if let Some(presence) = self.users.get_mut(user) {
            if let Some(count) = presence.topics.get_mut(topic) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    presence.topics.remove(topic);
                }
            }
            self.dirty.insert(user.clone());
        }
    }

    /// The rows of every user that changed since the last call.
    pub fn take_changes(&mut self) -> Vec<UserRows> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|user| match self.users.get(&user) {
                Some(p) => UserRows {
                    connections: p.opened.len() as u32,
                    since: p.opened.iter().min().copied(),
                    topics: p.topics.iter().map(|(t, n)| (t.clone(), *n)).collect(),
                    user,
                },
                None => UserRows { user, connections: 0, since: None, topics: Vec::new() },
            })
            .collect()
    }

    /// Everything, as after a restart of the writer or a database that lost the rows: mark every user dirty.
    pub fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.users.keys().cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_say_what_the_tables_should_hold_now_and_only_for_users_that_changed() {
        let mut book = PresenceBook::default();
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let t1 = t0 + Duration::from_secs(5);
        book.opened(&alice, t0);
        book.opened(&alice, t1);
        book.subscribed(&alice, "post:1");
        book.subscribed(&alice, "post:1");
        book.opened(&bob, t1);
        let mut changes = book.take_changes();
        changes.sort_by(|a, b| a.user.cmp(&b.user));
        assert_eq!(changes[0].connections, 2);
        assert_eq!(changes[0].since, Some(t0));
        assert_eq!(changes[0].topics, vec![("post:1".into(), 2)]);
        assert_eq!(changes[1].connections, 1);
        assert!(book.take_changes().is_empty(), "nothing changed since");
        // The oldest connection closes: since moves to the next; then the last one: a deletion.
        book.closed(&alice, t0);
        assert_eq!(book.take_changes()[0].since, Some(t1));
        book.closed(&alice, t1);
        let gone = book.take_changes();
        assert_eq!((gone[0].connections, gone[0].since), (0, None));
    }
}

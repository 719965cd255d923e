//! nudge relays "something new happened" hints from PostgreSQL to WebSocket clients.
//!
//! The data path, in the order an event travels it:
//! [`db::listen`] (NOTIFY) or a client's `wakeup` or the fallback poll -> [`wake::Wakeups`] ->
//! [`relay`] (one claim pass at a time, [`db::events::claim_batch`]; every node's delivery loop reads past its
//! cursor, [`db::events::read_after`]) -> [`hub::Hub`] (who is online) -> [`outbox::Outbox`] (per-connection
//! queue) -> [`connection`] (one socket) -> the client. What a connection reads from the table instead (a
//! `resume`, the catch-up of a queue that overflowed) comes through [`replay`], which joins it to that stream.
//!
//! `ARCHITECTURE.md` at the repository root is the map; each module's own doc says what it owns. These docs are
//! for the people who work on nudge, so they are built with private items (`cargo doc --document-private-items`,
//! which CI runs with warnings denied), and module docs may link to private items.
#![allow(rustdoc::private_intra_doc_links)]

pub mod auth;
pub mod config;
pub mod connection;
pub mod db;
pub mod demo;
pub mod health;
pub mod http;
pub mod hub;
pub mod jwks;
pub mod node;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod relay;
pub mod replay;
pub mod shutdown;
pub mod supervisor;
pub mod throwaway;
pub mod wake;

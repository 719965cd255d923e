//! The wake gate's session: how a node tells producers "I am claiming in a loop, skip your NOTIFY", and how it
//! makes sure, before it stops looping, that no row from a producer that skipped is left unclaimed.
//!
//! The protocol is in `sql/0003_wake_gate.sql`; this file only holds its two advisory locks. It needs a session
//! of its own (session-level locks, held across many claim transactions), so it connects like LISTEN does:
//! directly, never through PgBouncer. If the session dies PostgreSQL releases the locks, so producers NOTIFY
//! again; the relay then settles before it trusts being idle.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

use super::events::QueryError;

/// Held exclusively by an awake relay (must match sql/0003_wake_gate.sql).
const AWAKE: i64 = 121_450_474_726_657;
/// Held shared by every inserting transaction until it ends (must match sql/0003_wake_gate.sql).
const INFLIGHT: i64 = 121_450_474_726_658;
/// How long a node waits for `awake`: producers that did NOTIFY hold it shared until they commit (short), another
/// awake node holds it for as long as rows flow (then this node need not be awake at all).
const AWAKE_WAIT: Duration = Duration::from_millis(10);

pub struct Gate {
    client: Client,
    /// The connection's I/O task; aborted when the gate is dropped, which ends the session and its locks.
    driver: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Gate, tokio_postgres::Error> {
        let mut config = config.clone();
        // Operators find this session (and its locks, in pg_locks) by name.
        config.application_name("nudge-gate");
        let (client, connection) = config.connect(NoTls).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        client.batch_execute(&format!("SET lock_timeout = {}", AWAKE_WAIT.as_millis())).await?;
        Ok(Gate { client, driver })
    }

    /// Try to become the awake relay. False when the wait ran out (another node is awake, or a producer's
    /// transaction held its shared lock that long). Either way, producers may have skipped their NOTIFY while we
    /// asked: the caller must `settle` afterwards.
    pub async fn hold_awake(&self) -> Result<bool, tokio_postgres::Error> {
        match self.client.query_typed("SELECT pg_advisory_lock($1)", &[(&AWAKE, Type::INT8)]).await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Stop being awake: from now on producers NOTIFY again.
    pub async fn release_awake(&self) -> Result<(), tokio_postgres::Error> {
        self.client.query_typed("SELECT pg_advisory_unlock($1)", &[(&AWAKE, Type::INT8)]).await?;
        Ok(())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// True when, for an instant, no inserting transaction was in flight: every producer that skipped its NOTIFY has
/// ended, so a claim from now on sees its rows. Never waits (waiting would queue every new producer behind us).
/// One statement takes and drops the lock, so any session will do, the pool's (even through PgBouncer) included.
pub async fn producers_settled(pool: &deadpool_postgres::Pool) -> Result<bool, QueryError> {
    let client = pool.get().await?;
    let row = client
        .query_typed_one(
            "SELECT CASE WHEN pg_try_advisory_lock($1) THEN pg_advisory_unlock($1) ELSE false END",
            &[(&INFLIGHT, Type::INT8)],
        )
        .await?;
    Ok(row.get(0))
}

//! The wake gate's session: how a node tells producers "I am claiming in a loop, skip your NOTIFY", and how it
//! makes sure, before it stops looping, that no row from a producer that skipped is left unclaimed.
//!
//! The protocol is in `sql/0003_wake_gate.sql`; this file only holds its two advisory locks. `awake` lives in a
//! transaction on a session of its own (held across many claim transactions), so it connects like LISTEN does:
//! directly, never through PgBouncer. A node that freezes while awake (SIGSTOP, a stalled VM) must not silence
//! producers for everyone: the transaction runs with `idle_in_transaction_session_timeout`, a keepalive touches
//! it while the node lives, and PostgreSQL ends the session of a node that stops. Whenever the session ends,
//! PostgreSQL releases the lock, producers NOTIFY again, and the relay settles before it trusts being idle.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::{ConnectError, Database, QueryError, Session};

/// Held exclusively by an awake relay (must match sql/0003_wake_gate.sql).
const AWAKE: i64 = 121_450_474_726_657;
/// Held shared by every inserting transaction until it ends (must match sql/0003_wake_gate.sql).
const INFLIGHT: i64 = 121_450_474_726_658;
/// How long a node waits for `awake`: producers that did NOTIFY hold it shared until they commit (short), another
/// awake node holds it for as long as rows flow (then this node need not be awake at all).
const AWAKE_WAIT: Duration = Duration::from_millis(10);
/// A node silent this long while awake is frozen or gone: PostgreSQL ends its session, releasing `awake`.
const AWAKE_LEASE: Duration = Duration::from_millis(250);
/// How often a live awake node proves it is alive: well inside the lease, even on a busy runtime.
const KEEPALIVE: Duration = Duration::from_millis(50);

/// The wake gate's session: a direct connection whose open transaction holds `awake` while the claim loop is
/// awake. Dropping it ends the session, and PostgreSQL releases `awake` with it.
pub struct Gate {
    /// Shared with the keepalive task; dropping the gate (and the task) ends the session and its lock.
    session: Arc<Session>,
    /// Renews the lease while `awake` is held.
    keepalive: Option<tokio::task::JoinHandle<()>>,
}

impl Gate {
    /// Open the session (`application_name=nudge-gate`), with `lock_timeout` set to `AWAKE_WAIT`.
    pub async fn connect(config: &Database) -> Result<Gate, ConnectError> {
        let mut config = config.clone();
        // Operators find this session (and its lock, in pg_locks) by name.
        config.application_name("nudge-gate");
        let session = Session::connect(&config).await?;
        session.batch_execute(&format!("SET lock_timeout = {}", AWAKE_WAIT.as_millis())).await?;
        Ok(Gate { session: Arc::new(session), keepalive: None })
    }

    /// Try to become the awake relay. False when the wait ran out (another node is awake, or a producer's
    /// transaction held its shared lock that long). Either way, producers may have skipped their NOTIFY while we
    /// asked: the caller must settle afterwards.
    pub async fn hold_awake(&mut self) -> Result<bool, QueryError> {
        let begin = format!("BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}", AWAKE_LEASE.as_millis());
        self.session.batch_execute(&begin).await?;
        match self.session.query_typed("SELECT pg_advisory_xact_lock($1)", &[(&AWAKE, Type::INT8)]).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                self.session.batch_execute("ROLLBACK").await?;
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        let session = self.session.clone();
        self.keepalive = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEPALIVE);
            loop {
                tick.tick().await;
                if session.batch_execute("SELECT 1").await.is_err() {
                    return;
                }
            }
        }));
        Ok(true)
    }

    /// Stop being awake: from now on producers NOTIFY again.
    pub async fn release_awake(&mut self) -> Result<(), QueryError> {
        if let Some(keepalive) = self.keepalive.take() {
            keepalive.abort();
        }
        Ok(self.session.batch_execute("COMMIT").await?)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(keepalive) = self.keepalive.take() {
            keepalive.abort();
        }
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

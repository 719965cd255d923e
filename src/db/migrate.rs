//! The schema: numbered SQL files in `sql/`, embedded in the binary, applied in order under an advisory lock.
//!
//! Each file records its own version in `nudge.schema_migrations`, so applying it with `psql` is equivalent to
//! letting nudge apply it. The advisory lock makes concurrent starts of several nodes safe: the second waits, then
//! finds nothing left to do. At start, [`prepare_schema`] keeps trying (or, with `--no-migrate`, waiting for
//! someone else to) while the database is unreachable, and tells `/readyz` once the schema is current.

use tokio_postgres::Client;

use super::{Backoff, ConnectError, Session};
use crate::health::Readiness;
use crate::shutdown::Shutdown;

/// One file of `sql/`.
pub struct Migration {
    /// What the file records in `nudge.schema_migrations` (its number).
    pub version: i32,
    /// The file name, for logs and errors.
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. The newest version is what this binary needs.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "0001_events.sql", sql: include_str!("../../sql/0001_events.sql") },
    Migration { version: 2, name: "0002_cluster.sql", sql: include_str!("../../sql/0002_cluster.sql") },
    Migration { version: 3, name: "0003_wake_gate.sql", sql: include_str!("../../sql/0003_wake_gate.sql") },
    Migration { version: 4, name: "0004_topic_check.sql", sql: include_str!("../../sql/0004_topic_check.sql") },
    Migration { version: 5, name: "0005_claim_by_key.sql", sql: include_str!("../../sql/0005_claim_by_key.sql") },
    Migration { version: 6, name: "0006_safe_rows.sql", sql: include_str!("../../sql/0006_safe_rows.sql") },
    Migration { version: 7, name: "0007_presence.sql", sql: include_str!("../../sql/0007_presence.sql") },
    Migration { version: 8, name: "0008_claim_commit.sql", sql: include_str!("../../sql/0008_claim_commit.sql") },
];

/// Advisory lock key: "nudge" in ASCII, so it is recognisable in `pg_locks`.
const LOCK_KEY: i64 = 0x006e_7564_6765;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] ConnectError),
    #[error("migration {name} failed: {source}")]
    Apply { name: &'static str, source: tokio_postgres::Error },
    #[error("reading applied migrations failed: {0}")]
    Query(#[source] tokio_postgres::Error),
    #[error("schema is at version {found}, this nudge needs {needed}: run `nudge migrate`")]
    Outdated { found: i32, needed: i32 },
}

/// Bring the schema up to date (or, with `--no-migrate`, wait until someone else has), retrying with backoff
/// while the database is unreachable. Returns false if shutdown came first.
pub async fn prepare_schema(
    database: &super::Database,
    apply: bool,
    readiness: &Readiness,
    mut shutdown: Shutdown,
) -> bool {
    let mut backoff = Backoff::default();
    loop {
        let result = if apply { migrate(database).await.map(|_| ()) } else { check(database).await };
        match result {
            Ok(()) => {
                readiness.set_schema_ready();
                return true;
            }
            Err(e) => {
                tracing::warn!("database not ready: {e}");
                readiness.set_error(e.to_string());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.triggered() => return false,
        }
    }
}

/// Apply pending migrations; returns the versions applied now.
pub async fn migrate(config: &super::Database) -> Result<Vec<i32>, MigrateError> {
    let mut session = Session::connect(config).await.map_err(MigrateError::Connect)?;
    let result = apply_locked(&mut session).await;
    session.close().await;
    result
}

/// Check, without changing anything, that the schema is current (for `serve --no-migrate`).
pub async fn check(config: &super::Database) -> Result<(), MigrateError> {
    let session = Session::connect(config).await.map_err(MigrateError::Connect)?;
    let result = applied_versions(&session).await;
    session.close().await;
    let found = result?.into_iter().max().unwrap_or(0);
    let needed = latest_version();
    if found < needed {
        return Err(MigrateError::Outdated { found, needed });
    }
    Ok(())
}

/// The schema version this binary needs.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

async fn apply_locked(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await.map_err(MigrateError::Query)?;
    let result = apply_pending(client).await;
    // Released explicitly; the session ending would release it too.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await;
    result
}

async fn apply_pending(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    let applied = applied_versions(client).await?;
    let mut now_applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let apply = |source| MigrateError::Apply { name: migration.name, source };
        let tx = client.transaction().await.map_err(apply)?;
        tx.batch_execute(migration.sql).await.map_err(apply)?;
        tx.commit().await.map_err(apply)?;
        tracing::info!(version = migration.version, file = migration.name, "applied migration");
        now_applied.push(migration.version);
    }
    Ok(now_applied)
}

async fn applied_versions(client: &Client) -> Result<Vec<i32>, MigrateError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('nudge.schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(MigrateError::Query)?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query("SELECT version FROM nudge.schema_migrations ORDER BY version", &[])
        .await
        .map_err(MigrateError::Query)?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

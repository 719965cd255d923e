//! The one error of nudge's queries, whichever table they touch, and [`within`], the client-side statement
//! timeout every loop and replay query runs under.
//!
//! One type because the callers' answer never depends on which query failed: a loop reports the error, backs
//! off and retries; a replay answers `complete: false`. What they need to tell apart is the kind of failure: no
//! session to be had, a statement PostgreSQL refused or lost, or no answer at all.

use std::time::Duration;

use deadpool_postgres::Pool;

/// Why a query on the pool (or on a direct session, `Pool` aside) did not give its answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The pool had no session to hand out: the database is unreachable, or every session is busy.
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// The statement timeout ran out on the client side (`within`, or the wake gate's own session).
    #[error("no answer from the database within {0:?} (NUDGE_STATEMENT_TIMEOUT)")]
    Timeout(Duration),
}

/// Run one of nudge's own queries on `pool` with a client-side limit: a database session that went silent (no
/// RST) must not hang a loop until the kernel gives up on it. A query that times out makes every pooled session
/// opened before it suspect (`db::distrust_sessions`): a silent path costs one timeout, not one per session.
pub async fn within<T>(
    pool: &Pool,
    limit: Duration,
    query: impl std::future::Future<Output = Result<T, QueryError>>,
) -> Result<T, QueryError> {
    match tokio::time::timeout(limit, query).await {
        Ok(result) => result,
        Err(_) => {
            super::distrust_sessions(std::slice::from_ref(pool));
            Err(QueryError::Timeout(limit))
        }
    }
}

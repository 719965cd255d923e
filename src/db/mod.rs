//! Everything nudge says to PostgreSQL: the schema ([`migrate`]), the LISTEN connection ([`listen`]), and the
//! claim and retention queries ([`claim`]). Claims and cleanup use a deadpool pool; LISTEN has its own session.

pub mod events;
pub mod gate;
pub mod listen;
pub mod migrate;
pub mod nodes;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// A direct session, not from the pool: for migrations, `nudge status`, the demo's setup and the wake gate.
/// Derefs to the client; `close` ends it cleanly (the server sees a Terminate, not a reset).
pub struct Session {
    client: tokio_postgres::Client,
    /// Drives the connection's I/O; ends once the client is dropped.
    driver: tokio::task::JoinHandle<()>,
}

impl Session {
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Session, tokio_postgres::Error> {
        let (client, connection) = config.connect(NoTls).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Session { client, driver })
    }

    pub async fn close(self) {
        let Session { client, driver } = self;
        drop(client);
        let _ = driver.await;
    }
}

impl std::ops::Deref for Session {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.client
    }
}

pub fn pool(config: &tokio_postgres::Config, size: usize) -> Result<Pool, deadpool_postgres::BuildError> {
    let mut config = config.clone();
    if config.get_application_name().is_none() {
        config.application_name("nudge");
    }
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        // A pool waiting forever would hide a dead database behind hanging passes.
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
}

/// Exponential backoff for reconnects: 100 ms doubling to 5 s, with jitter so nodes do not retry in lockstep.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        // Cheap jitter from the clock: up to +25 %.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        delay + delay.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

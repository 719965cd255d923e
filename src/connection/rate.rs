//! The per-connection request rate limit (`NUDGE_CLIENT_RATE`): a token bucket, so a client may burst, and a
//! message over the limit is dropped with `rate_limited` while the connection stays open.

use tokio::time::Instant;

/// Token bucket: `rate` messages per second, bursts of up to `rate`.
pub(super) struct RateLimit {
    /// Messages per second, and the size of a burst: one setting, as documented for `NUDGE_CLIENT_RATE`.
    rate: f32,
    /// Messages the client may send right now; refilled by the time since `last`, never above `rate`.
    tokens: f32,
    /// When `tokens` was last refilled: the bucket is refilled lazily, on each message, so it needs no timer.
    last: Instant,
}

impl RateLimit {
    pub(super) fn new(rate: u32) -> Self {
        RateLimit { rate: rate as f32, tokens: rate as f32, last: Instant::now() }
    }

    /// Take one token if there is one: whether this message may be served.
    pub(super) fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f32() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The `rate_limited` error's message.
    pub(super) fn message(&self) -> String {
        format!("more than {} messages per second; this one was dropped", self.rate)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_rate_messages_then_one_per_share_of_a_second() {
        let mut limit = RateLimit::new(4);
        assert_eq!((0..5).map(|_| limit.allow()).collect::<Vec<_>>(), [true, true, true, true, false]);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(limit.allow());
        assert!(!limit.allow());
        // Idle for long: the bucket refills to one burst, not more.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!((0..5).filter(|_| limit.allow()).count(), 4);
    }
}

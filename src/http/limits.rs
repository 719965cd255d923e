//! What a TCP connection may cost before it is a WebSocket: admission at accept (the pending cap and the
//! per-address cap), and the deadlines on request headers and on idle keep-alive connections.
//!
//! Admission is decided right after `accept`, before a task is spawned or a byte is read, so a refused
//! connection costs one accept and one close. A full pending cap does not turn the newcomer away: it closes the
//! *oldest* connection still speaking HTTP. A real client upgrades within milliseconds of connecting, so to push
//! it out an attacker would have to open `NUDGE_MAX_PENDING_CONNECTIONS` sockets within those milliseconds;
//! refusing the newcomer instead let a few thousand idle sockets lock every real client out until the header
//! timeout. The deadlines are enforced by hyper itself: its HTTP/1 server
//! runs its header-read timer from the moment it starts waiting for a request head (at once for the first
//! request; right after the previous response for the next one on a kept-alive connection) until the head is
//! parsed. [`HeaderClock`] is the timer nudge gives it, one per connection, and it decides which deadline that
//! wait has:
//!
//! - the first request: `header_timeout` counted from accept (a TLS handshake included), whether the client
//!   sends nothing, part of a header, or a header one byte at a time;
//! - a later request on a kept-alive connection: `keep_alive_timeout` from the previous response while no
//!   byte arrives, then `header_timeout` from the first byte of the next request.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::config::HttpLimits;

/// The caps checked at accept, and what they refused.
pub(super) struct Admission {
    /// One permit per connection not yet upgraded (or closed); taken with `forget` and given back by
    /// [`ConnState::not_pending`].
    pending: Arc<Semaphore>,
    max_pending: usize,
    per_ip: Option<Arc<PerIp>>,
    /// Connections admitted, oldest first, while they may still be pending: who is closed when the cap is full.
    /// Entries of connections that upgraded or closed are dropped as they are met, and pruned when the queue
    /// grows past twice the cap.
    admitted: Mutex<VecDeque<Weak<ConnState>>>,
    refused_pending: AtomicU64,
    refused_per_ip: AtomicU64,
}

/// A connection let in.
pub(super) struct Admitted {
    pub state: Arc<ConnState>,
    ip: Option<IpGuard>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// `NUDGE_MAX_PENDING_CONNECTIONS` connections are still speaking HTTP.
    Pending,
    /// This address holds `NUDGE_MAX_CONNECTIONS_PER_IP` connections.
    PerIp,
}

impl Admission {
    pub fn new(limits: &HttpLimits) -> Admission {
        Admission {
            pending: Arc::new(Semaphore::new(limits.max_pending)),
            max_pending: limits.max_pending,
            per_ip: limits.max_per_ip.map(|max| Arc::new(PerIp { max, counts: Mutex::default() })),
            admitted: Mutex::default(),
            refused_pending: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
        }
    }

    /// Let a connection from `ip` in, or say which cap it hits.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refused> {
        let admitted = self.try_admit(ip);
        match admitted {
            Err(Refused::Pending) => self.refused_pending.fetch_add(1, Ordering::Relaxed),
            Err(Refused::PerIp) => self.refused_per_ip.fetch_add(1, Ordering::Relaxed),
            Ok(_) => 0,
        };
        admitted
    }

    fn try_admit(&self, ip: IpAddr) -> Result<Admitted, Refused> {
        // The address first: a pending permit would otherwise be taken and given back for nothing.
        let ip = match &self.per_ip {
            Some(per_ip) => Some(per_ip.enter(ip).ok_or(Refused::PerIp)?),
            None => None,
        };
        let mut admitted = self.admitted.lock().unwrap_or_else(PoisonError::into_inner);
        while self.pending.try_acquire().map(|permit| permit.forget()).is_err() {
            // Full: close the oldest connection still pending; its place is ours.
            let oldest = admitted.pop_front().ok_or(Refused::Pending)?;
            if let Some(victim) = oldest.upgrade() {
                if victim.evict() {
                    self.refused_pending.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let state = Arc::new(ConnState {
            bytes_read: AtomicU64::new(0),
            pending: self.pending.clone(),
            is_pending: AtomicBool::new(true),
            evicted: Notify::new(),
        });
        if admitted.len() >= self.max_pending.saturating_mul(2) {
            admitted.retain(|conn| conn.upgrade().is_some_and(|conn| conn.is_pending.load(Ordering::Acquire)));
        }
        admitted.push_back(Arc::downgrade(&state));
        Ok(Admitted { state, ip })
    }

    /// Connections accepted and not yet upgraded or closed.
    pub fn pending(&self) -> usize {
        self.max_pending.saturating_sub(self.pending.available_permits())
    }

    /// The `/metrics` lines of the caps.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = "nudge_http_pending_connections";
        let help = "TCP connections accepted and not yet upgraded to WebSocket or closed.";
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", self.pending());
        let name = "nudge_http_refused_total";
        let help = "TCP connections closed at accept, by the cap they hit.";
        let (pending, per_ip) = self.refused();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(out, "{name}{{cap=\"pending\"}} {pending}\n{name}{{cap=\"per_ip\"}} {per_ip}");
    }

    /// Connections closed at accept so far: (over the pending cap, over the per-address cap).
    pub fn refused(&self) -> (u64, u64) {
        (self.refused_pending.load(Ordering::Relaxed), self.refused_per_ip.load(Ordering::Relaxed))
    }
}

/// Open TCP connections per address (IPv4-mapped IPv6 addresses count as their IPv4 address).
struct PerIp {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<IpGuard> {
        let ip = ip.to_canonical();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpGuard { per_ip: self.clone(), ip })
    }
}

/// One connection counted against its address until dropped.
struct IpGuard {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut counts = self.per_ip.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What the socket, hyper's timer and the connection task share about one connection.
pub(super) struct ConnState {
    /// Bytes read from the socket so far (see [`HeaderClock`]).
    bytes_read: AtomicU64,
    pending: Arc<Semaphore>,
    is_pending: AtomicBool,
    /// Told when a newer connection took this one's place under the pending cap: its task closes it.
    pub evicted: Notify,
}

impl ConnState {
    /// The connection is upgraded or closing: give its place under the pending cap back (once).
    pub fn not_pending(&self) {
        if self.is_pending.swap(false, Ordering::AcqRel) {
            self.pending.add_permits(1);
        }
    }

    /// Give this connection's place to a newer one and tell its task to close it; false if it was no longer
    /// pending (upgraded or closing: nothing to take).
    fn evict(&self) -> bool {
        if !self.is_pending.swap(false, Ordering::AcqRel) {
            return false;
        }
        self.pending.add_permits(1);
        self.evicted.notify_one();
        true
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.not_pending();
    }
}

/// The socket as nudge serves it: counts the bytes it reads (for [`HeaderClock`]) and holds the connection's
/// places under the caps. The per-address place lives as long as the socket, whether it ends as HTTP or as a
/// WebSocket; both places are given back before the socket is shut down or closed, so a client that has seen
/// the close can count on the place being free.
pub(super) struct Tracked<IO> {
    io: IO,
    state: Arc<ConnState>,
    ip: Option<IpGuard>,
}

impl<IO> Tracked<IO> {
    pub fn new(io: IO, admitted: Admitted) -> Tracked<IO> {
        Tracked { io, state: admitted.state, ip: admitted.ip }
    }

    fn closing(&mut self) {
        self.state.not_pending();
        self.ip = None;
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        // Runs before `io` is dropped (closed).
        self.closing();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.state.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.closing();
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// hyper's timer for one connection. hyper's HTTP/1 server uses its timer for the header-read timeout only,
/// and asks for one sleep per request head it waits for; see the module comment for the deadlines.
pub(super) struct HeaderClock {
    first_deadline: Instant,
    header_timeout: Duration,
    keep_alive_timeout: Duration,
    state: Arc<ConnState>,
    first_taken: AtomicBool,
}

impl HeaderClock {
    pub fn new(accepted: Instant, limits: &HttpLimits, state: Arc<ConnState>) -> HeaderClock {
        HeaderClock {
            first_deadline: accepted + limits.header_timeout,
            header_timeout: limits.header_timeout,
            keep_alive_timeout: limits.keep_alive_timeout,
            state,
            first_taken: AtomicBool::new(false),
        }
    }

    /// The deadline of the next request head hyper waits for (hyper's own deadline is ignored).
    fn next_wait(&self) -> HeaderSleep {
        if !self.first_taken.swap(true, Ordering::Relaxed) {
            return HeaderSleep { sleep: Box::pin(tokio::time::sleep_until(self.first_deadline)), idle: None };
        }
        HeaderSleep {
            sleep: Box::pin(tokio::time::sleep(self.keep_alive_timeout)),
            idle: Some(Idle {
                state: self.state.clone(),
                seen: self.state.bytes_read.load(Ordering::Relaxed),
                header_timeout: self.header_timeout,
            }),
        }
    }
}

impl hyper::rt::Timer for HeaderClock {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // Not used by hyper's HTTP/1 server; a plain sleep, should a later hyper ask for one.
        Box::pin(HeaderSleep { sleep: Box::pin(tokio::time::sleep(duration)), idle: None })
    }

    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.next_wait())
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, _new_deadline: std::time::Instant) {
        *sleep = Box::pin(self.next_wait());
    }
}

/// One wait for a request head.
struct HeaderSleep {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Set while a kept-alive connection waits for the first byte of its next request.
    idle: Option<Idle>,
}

struct Idle {
    state: Arc<ConnState>,
    seen: u64,
    header_timeout: Duration,
}

impl Future for HeaderSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // hyper polls this after every read that leaves the head incomplete, so the first byte of the next
        // request is seen here as soon as it is read.
        if let Some(idle) = &this.idle {
            if idle.state.bytes_read.load(Ordering::Relaxed) != idle.seen {
                let deadline = Instant::now() + idle.header_timeout;
                this.idle = None;
                this.sleep.as_mut().reset(deadline);
            }
        }
        this.sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeaderSleep {}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_per_ip: Option<usize>) -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_secs(5),
            max_header_size: 8192,
            max_pending: 2,
            max_per_ip,
        }
    }

    #[test]
    fn the_pending_place_comes_back_once_when_the_connection_is_no_longer_pending() {
        let admission = Admission::new(&limits(None));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = admission.admit(ip).map_err(|_| ()).expect("first");
        let b = admission.admit(ip).map_err(|_| ()).expect("second");
        b.state.not_pending();
        b.state.not_pending();
        assert_eq!(admission.pending(), 1, "given back once");
        drop(b);
        assert_eq!(admission.pending(), 1, "and not again when dropped");
        drop(a);
        assert_eq!(admission.pending(), 0, "dropping gives it back too");
    }

    #[tokio::test]
    async fn a_full_cap_evicts_the_oldest_connection_still_pending() {
        let admission = Admission::new(&limits(None));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = admission.admit(ip).map_err(|_| ()).expect("first");
        let b = admission.admit(ip).map_err(|_| ()).expect("second");
        let c = admission.admit(ip).map_err(|_| ()).expect("third takes the oldest's place");
        assert_eq!((admission.pending(), admission.refused()), (2, (1, 0)));
        // The oldest is told to close, and giving its place back again is a no-op.
        tokio::time::timeout(Duration::from_secs(1), a.state.evicted.notified()).await.expect("a evicted");
        a.state.not_pending();
        assert_eq!(admission.pending(), 2);
        // An upgraded connection is never evicted: the next one goes past it to the oldest still pending.
        b.state.not_pending();
        let _d = admission.admit(ip).map_err(|_| ()).expect("fits: b no longer pending");
        let _e = admission.admit(ip).map_err(|_| ()).expect("evicts c, not b");
        tokio::time::timeout(Duration::from_secs(1), c.state.evicted.notified()).await.expect("c evicted");
        assert_eq!(admission.refused(), (2, 0));
    }

    #[test]
    fn the_address_count_lives_as_long_as_the_socket_and_mapped_addresses_count_once() {
        let admission = Admission::new(&HttpLimits { max_pending: 100, ..limits(Some(2)) });
        let v4: IpAddr = [10, 0, 0, 1].into();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("an address");
        let a = Tracked::new((), admission.admit(v4).map_err(|_| ()).expect("first"));
        // Upgraded: no longer pending, but the address count stays with the socket.
        let b = Tracked::new((), admission.admit(mapped).map_err(|_| ()).expect("second"));
        b.state.not_pending();
        assert_eq!(admission.admit(v4).err(), Some(Refused::PerIp));
        assert_eq!(admission.refused(), (0, 1));
        assert!(admission.admit([10, 0, 0, 2].into()).is_ok(), "other addresses are not affected");
        drop(a);
        assert!(admission.admit(v4).is_ok(), "one place free again");
        drop(b);
        let per_ip = admission.per_ip.as_ref().expect("per-address cap");
        assert!(per_ip.counts.lock().expect("lock").is_empty(), "no entry is kept for an address with none");
    }
}

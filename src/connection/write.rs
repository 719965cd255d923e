//! Everything that puts bytes on a connection's socket: replies and control frames through tungstenite, event
//! frames encoded into one buffer and written with one `write()`, and the close handshake.
//!
//! Event frames bypass tungstenite's encoder (one system call per batch rather than per frame), so they are
//! written only once tungstenite's own buffer is flushed: frames never interleave. A slow reader that keeps
//! reading is never cut off; one that stopped is noticed after `NUDGE_WRITE_TIMEOUT`, whatever the batch's size,
//! because the limit applies to each `write()` making progress, not to the batch. Where the stall happened
//! decides how the connection can end: at a frame boundary a close frame (1013) is still valid; inside a frame
//! it would be read as the rest of that frame, so the socket is dropped.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{Connection, Step};
use crate::hub::Frame;
use crate::protocol;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Write the live frames the join admits (a replay or a catch-up may have written some already), in one
    /// buffer.
    pub(super) async fn write_frames(&mut self, frames: &[Frame]) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        let mut batch = Vec::new();
        for frame in frames.iter().filter(|frame| session.written.admit(frame.seq)) {
            protocol::encode_text_frame(&mut batch, frame.text.as_bytes());
        }
        self.write_encoded(&batch).await
    }

    /// Write frames read from the table, all of them, in one buffer: one `write()`, so that a storm of resumes
    /// does not cost a system call per replayed event.
    pub(super) async fn write_replayed(&mut self, frames: &[Frame]) -> Step {
        let mut batch = Vec::new();
        for frame in frames {
            protocol::encode_text_frame(&mut batch, frame.text.as_bytes());
        }
        self.write_encoded(&batch).await
    }

    /// Write frames already encoded into one buffer with one `write()`, after whatever tungstenite holds.
    pub(super) async fn write_encoded(&mut self, batch: &[u8]) -> Step {
        if batch.is_empty() {
            return Step::Continue;
        }
        let limit = self.shared.limits.write_timeout;
        // Anything tungstenite still holds (a reply, an automatic pong) goes first: frames never interleave.
        match tokio::time::timeout(limit, self.ws.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Step::Gone(format!("write failed: {e}")),
            Err(_) => return not_reading(),
        }
        match write_with_progress(self.ws.get_mut(), batch, limit).await {
            Ok(()) => Step::Continue,
            Err(Stalled::Io(e)) => Step::Gone(format!("write failed: {e}")),
            // Nothing of this batch went out: the stream is at a frame boundary, a close frame is still valid.
            Err(Stalled::AtBoundary) => not_reading(),
            Err(Stalled::MidFrame) => {
                // A close frame now would be read as the rest of the cut frame: drop the socket instead.
                self.shared.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                Step::Gone("not reading (write timed out mid-frame)".into())
            }
        }
    }

    /// Send one message through tungstenite (a reply, a ping), bounded by the write timeout like event frames.
    pub(super) async fn write(&mut self, message: Message) -> Result<(), WsError> {
        match tokio::time::timeout(self.shared.limits.write_timeout, self.ws.send(message)).await {
            Ok(result) => result,
            Err(_) => Err(WsError::Io(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// Send a close frame and wait (briefly) for the peer's, so the client reads our code rather than a reset.
    pub(super) async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if self.ws.close(Some(frame)).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
    }
}

/// A socket that accepted nothing for the write timeout, at a frame boundary: 1013.
fn not_reading() -> Step {
    Step::Close { code: protocol::CLOSE_TOO_SLOW, reason: "not reading", error: None }
}

/// Why `write_with_progress` gave up.
enum Stalled {
    Io(std::io::Error),
    /// No byte of the buffer was accepted within the limit.
    AtBoundary,
    /// Part of it was: the stream now ends inside a frame.
    MidFrame,
}

/// Write all of `buf`, giving up only when the socket accepts nothing for `limit`.
async fn write_with_progress<W: AsyncWrite + Unpin>(
    socket: &mut W,
    buf: &[u8],
    limit: Duration,
) -> Result<(), Stalled> {
    let mut written = 0;
    while written < buf.len() {
        match tokio::time::timeout(limit, socket.write(&buf[written..])).await {
            Ok(Ok(0)) => return Err(Stalled::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err(Stalled::Io(e)),
            Err(_) if written == 0 => return Err(Stalled::AtBoundary),
            Err(_) => return Err(Stalled::MidFrame),
        }
    }
    match tokio::time::timeout(limit, socket.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Stalled::Io(e)),
        Err(_) => Err(Stalled::MidFrame),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_keeps_reading_is_never_cut_off_however_long_the_batch_takes() {
        let (mut socket, mut reader) = tokio::io::duplex(16);
        let slow = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0; 16];
            while got.len() < 160 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let n = reader.read(&mut chunk).await.expect("read");
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        let started = tokio::time::Instant::now();
        assert!(write_with_progress(&mut socket, &[7; 160], LIMIT).await.is_ok());
        // Ten reads five seconds apart: far beyond the limit in total, never beyond it per write.
        assert!(started.elapsed() > LIMIT * 4);
        assert_eq!(slow.await.expect("reader"), [7; 160]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_told_apart_at_a_frame_boundary_and_inside_a_frame() {
        let (mut socket, _reader) = tokio::io::duplex(16);
        // 16 of 40 bytes fit: the stream ends inside this batch.
        assert!(matches!(write_with_progress(&mut socket, &[1; 40], LIMIT).await, Err(Stalled::MidFrame)));
        // Nothing fits any more: the next batch never started.
        assert!(matches!(write_with_progress(&mut socket, &[2; 8], LIMIT).await, Err(Stalled::AtBoundary)));
    }
}

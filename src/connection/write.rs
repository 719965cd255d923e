//! Writing a batch of encoded frames to a socket whose reader may be slow or gone, and telling the two apart.
//!
//! A slow reader that keeps reading is never cut off; one that stopped is noticed after `NUDGE_WRITE_TIMEOUT`,
//! whatever the batch's size, because the limit applies to each `write()` making progress, not to the batch.
//! Where the stall happened decides how the connection can end: at a frame boundary a close frame (1013) is still
//! valid; inside a frame it would be read as the rest of that frame.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Why `write_with_progress` gave up.
pub(super) enum Stalled {
    Io(std::io::Error),
    /// No byte of the buffer was accepted within the limit.
    AtBoundary,
    /// Part of it was: the stream now ends inside a frame.
    MidFrame,
}

/// Write all of `buf`, giving up only when the socket accepts nothing for `limit`.
pub(super) async fn write_with_progress<W: AsyncWrite + Unpin>(
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

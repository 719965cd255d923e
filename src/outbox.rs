//! `Outbox`: one connection's bounded queue of event frames, from the hub (one producer) to the connection task
//! (one consumer).
//!
//! Why not `tokio::sync::mpsc`: a tokio channel allocates its first block of 32 slots (about 1.3 KiB here) when it
//! is created, and every idle connection has one. An `Outbox` is a mutex around a `VecDeque` that allocates only
//! when frames are queued and gives the memory back when it drains, so an idle connection's queue costs ~150 bytes.
//! One producer and one consumer mean `Notify::notify_one`'s stored permit is enough: no wake-up is lost.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::hub::Frame;

pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the connection: a frame was queued, or the outbox was closed.
    queued: Notify,
    /// Wakes the hub waiting for room (`push_until`).
    room: Notify,
    capacity: usize,
}

struct State {
    frames: VecDeque<Frame>,
    /// Set by the hub when it drops the connection for not reading; the connection drains, then closes with 1013.
    closed: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds `capacity` frames; the frame is handed back.
    Full(Frame),
    Closed,
}

/// A queue that outgrew this many slots is released when it drains, so a past burst does not stay resident.
const KEEP_CAPACITY: usize = 16;

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Outbox {
            state: Mutex::new(State { frames: VecDeque::new(), closed: false }),
            queued: Notify::new(),
            room: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queue a frame unless the outbox is full or closed. Never waits.
    pub fn try_push(&self, frame: Frame) -> Result<(), PushError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.frames.len() >= self.capacity {
            return Err(PushError::Full(frame));
        }
        state.frames.push_back(frame);
        drop(state);
        self.queued.notify_one();
        Ok(())
    }

    /// Queue as many of `frames` as fit, in order, with one lock and one wake-up; returns how many were queued.
    /// `Err(Closed)` if the outbox is closed. (A topic event batch goes to each subscriber this way.)
    pub fn try_push_many(&self, frames: &[Frame]) -> Result<usize, PushError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed);
        }
        let room = self.capacity.saturating_sub(state.frames.len());
        let queued = frames.len().min(room);
        state.frames.extend(frames[..queued].iter().cloned());
        drop(state);
        if queued > 0 {
            self.queued.notify_one();
        }
        Ok(queued)
    }

    /// Queue a frame, waiting for room until `deadline`. `Err(Full)` means the reader did not make room in time.
    pub async fn push_until(&self, mut frame: Frame, deadline: Instant) -> Result<(), PushError> {
        loop {
            // Registered before trying, so a pop between the try and the wait still wakes us.
            let room = self.room.notified();
            match self.try_push(frame) {
                Err(PushError::Full(back)) => frame = back,
                done => return done,
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(PushError::Full(frame));
            }
        }
    }

    /// The next frame, if one is queued now.
    pub fn try_pop(&self) -> Option<Frame> {
        let mut state = self.lock();
        let frame = state.frames.pop_front();
        if state.frames.is_empty() && state.frames.capacity() > KEEP_CAPACITY {
            state.frames = VecDeque::new();
        }
        drop(state);
        if frame.is_some() {
            self.room.notify_one();
        }
        frame
    }

    /// Move up to `max` queued frames into `into`, with one lock and one wake-up; returns how many.
    pub fn pop_many(&self, into: &mut Vec<Frame>, max: usize) -> usize {
        let mut state = self.lock();
        let n = state.frames.len().min(max);
        into.extend(state.frames.drain(..n));
        if state.frames.is_empty() && state.frames.capacity() > KEEP_CAPACITY {
            state.frames = VecDeque::new();
        }
        drop(state);
        if n > 0 {
            self.room.notify_one();
        }
        n
    }

    /// The next frame, waiting for one; `None` once the outbox is closed and drained.
    pub async fn pop(&self) -> Option<Frame> {
        loop {
            let queued = self.queued.notified();
            if let Some(frame) = self.try_pop() {
                return Some(frame);
            }
            if self.lock().closed {
                return None;
            }
            queued.await;
        }
    }

    /// Refuse further frames; the reader gets what is queued, then `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.queued.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding this lock; a poisoned queue is still a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn frame(seq: i64) -> Frame {
        Frame { seq, text: format!("{seq}").into() }
    }

    #[tokio::test]
    async fn bounded_in_order_and_drained_after_close() {
        let outbox = Outbox::new(2);
        assert_eq!(outbox.try_push(frame(1)), Ok(()));
        assert_eq!(outbox.try_push(frame(2)), Ok(()));
        assert!(matches!(outbox.try_push(frame(3)), Err(PushError::Full(f)) if f.seq == 3));
        outbox.close();
        assert_eq!(outbox.try_push(frame(4)), Err(PushError::Closed));
        assert_eq!(outbox.pop().await.map(|f| f.seq), Some(1));
        assert_eq!(outbox.pop().await.map(|f| f.seq), Some(2));
        assert_eq!(outbox.pop().await.map(|f| f.seq), None);
    }

    #[tokio::test]
    async fn many_at_once_queue_what_fits_in_order_and_pop_in_order() {
        let outbox = Outbox::new(3);
        assert_eq!(outbox.try_push(frame(1)), Ok(()));
        assert_eq!(outbox.try_push_many(&[frame(2), frame(3), frame(4)]), Ok(2));
        let mut popped = Vec::new();
        assert_eq!(outbox.pop_many(&mut popped, 2), 2);
        assert_eq!(outbox.try_push_many(&[frame(4)]), Ok(1));
        assert_eq!(outbox.pop_many(&mut popped, 10), 2);
        assert_eq!(popped.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        outbox.close();
        assert_eq!(outbox.try_push_many(&[frame(5)]), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn a_waiting_push_gets_room_when_the_reader_pops() {
        let outbox = Arc::new(Outbox::new(1));
        outbox.try_push(frame(1)).expect("room");
        let reader = {
            let outbox = outbox.clone();
            tokio::spawn(async move { (outbox.pop().await, outbox.pop().await) })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(outbox.push_until(frame(2), deadline).await, Ok(()));
        let (first, second) = reader.await.expect("reader");
        assert_eq!((first.map(|f| f.seq), second.map(|f| f.seq)), (Some(1), Some(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_push_gives_up_at_the_deadline() {
        let outbox = Outbox::new(1);
        outbox.try_push(frame(1)).expect("room");
        let deadline = Instant::now() + Duration::from_millis(500);
        assert!(matches!(outbox.push_until(frame(2), deadline).await, Err(PushError::Full(_))));
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let outbox = Outbox::new(1000);
        for seq in 0..500 {
            outbox.try_push(frame(seq)).expect("room");
        }
        while outbox.try_pop().is_some() {}
        assert_eq!(outbox.lock().frames.capacity(), 0);
    }
}
